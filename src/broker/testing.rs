//! An in-process broker for the broker's own tests: a real core, outbox (in a temporary
//! directory) and intake, with connections over in-memory streams.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

use super::codec::{Connect, Header, Packet, Properties, Protocol, Publish, SubOptions, Subscribe};
use super::{connection, Intake, Settings, Shared};

pub struct TestBroker {
    pub shared: Arc<Shared>,
    _dir: tempfile::TempDir,
    _rules: watch::Sender<Arc<Vec<super::IntakeRule>>>,
    _automation: watch::Sender<crate::automation::RuleSet>,
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let health = Arc::new(crate::Health::default());
        let config = crate::config::parse(
            "test.toml",
            &format!(
                "[gateway]\nid = \"t\"\ndata_dir = \"{}\"\n[local]\nconnect_timeout = \"1s\"\n[cloud]\nurl = \"mqtt://127.0.0.1:1\"\n",
                dir.path().display()
            ),
        )
        .expect("a valid test config");
        let (outbox, owner) = crate::outbox::open(&config.queue, dir.path(), health.clone())
            .expect("an outbox in the temporary directory");
        tokio::spawn(owner.run());
        let (rules, rules_rx) = watch::channel(Arc::new(Vec::new()));
        let (automation, automation_rx) = watch::channel(Arc::new(Vec::new()));
        let (feed, _readings) = crate::automation::feed(automation_rx, health.clone());
        let intake = Intake {
            rules: rules_rx,
            feed,
            outbox,
            health: health.clone(),
        };
        let policy = super::policy::Policy {
            allow_anonymous: true,
            ..Default::default()
        }
        .shared();
        let shared = Shared::new(
            super::limits(&config),
            Settings::of(&config.local),
            policy,
            intake,
            health,
        );
        let opened = super::persist::open(dir.path(), false, &shared.health)
            .expect("state.db in the temporary directory");
        super::persist::start(&shared, opened).expect("the state writer");
        TestBroker {
            shared,
            _dir: dir,
            _rules: rules,
            _automation: automation,
        }
    }

    /// A new connection; the broker serves the other end.
    pub fn connect(&self) -> DuplexStream {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let permit = self.shared.permit().expect("a connection permit");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        tokio::spawn(connection::serve(
            self.shared.clone(),
            theirs,
            "127.0.0.1:1".parse().expect("an address"),
            None,
            permit,
            deadline,
        ));
        ours
    }

    /// The core's books agree with themselves.
    pub fn check_books(&self) {
        let core = self.shared.lock();
        let mut subscriptions = 0;
        for (key, s) in core.sessions.iter() {
            assert_eq!(
                core.by_client.get(&s.client_id),
                Some(&key),
                "{}",
                s.client_id
            );
            assert!(s.inflight.len() <= usize::from(s.receive_max).max(1) + 8);
            subscriptions += s.subscriptions.len();
        }
        assert_eq!(core.router.len(), subscriptions);
        assert_eq!(core.by_client.len(), core.sessions.len());
    }

    /// A fresh subscriber gets a fresh publisher's message.
    pub async fn still_serves(&self) {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut sub = self.connect();
            handshake(&mut sub, "canary-sub", protocol).await;
            let subscribe = Packet::Subscribe(Subscribe {
                packet_id: 1,
                props: Properties::default(),
                filters: vec![(
                    "canary/#",
                    SubOptions {
                        qos: 1,
                        ..SubOptions::default()
                    },
                )],
            });
            sub.write_all(&subscribe.to_vec(protocol)).await.unwrap();
            let suback = read_packet(&mut sub).await.expect("a SUBACK");
            assert_eq!(suback[0] >> 4, 9);
            let mut publisher = self.connect();
            handshake(&mut publisher, "canary-pub", protocol).await;
            let publish = Packet::Publish(Publish {
                dup: false,
                qos: 1,
                retain: false,
                topic: "canary/x",
                packet_id: 1,
                props: Properties::default(),
                payload: b"alive",
            });
            publisher
                .write_all(&publish.to_vec(protocol))
                .await
                .unwrap();
            let puback = read_packet(&mut publisher).await.expect("a PUBACK");
            assert_eq!(puback[0] >> 4, 4);
            let delivery = read_packet(&mut sub).await.expect("the canary's message");
            match Packet::parse(&delivery, protocol) {
                Ok(Packet::Publish(p)) => assert_eq!(p.payload, b"alive"),
                other => panic!("not the canary's message: {other:?}"),
            }
        }
    }
}

async fn handshake(stream: &mut DuplexStream, client_id: &str, protocol: Protocol) {
    let connect = Connect {
        level: if protocol == Protocol::V5 { 5 } else { 4 },
        clean_start: true,
        keep_alive: 0,
        props: Properties::default(),
        client_id,
        will: None,
        username: None,
        password: None,
    };
    stream
        .write_all(&Packet::Connect(Box::new(connect)).to_vec(protocol))
        .await
        .unwrap();
    let connack = read_packet(stream).await.expect("a CONNACK");
    assert_eq!((connack[0], connack[3]), (0x20, 0), "CONNACK {connack:?}");
}

/// The next whole packet, within a second.
pub async fn read_packet(stream: &mut DuplexStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            if let Ok(Some(h)) = Header::parse(&buf) {
                if buf.len() >= h.total() {
                    return Some(buf);
                }
            }
            match stream.read(&mut byte).await {
                Ok(1) => buf.push(byte[0]),
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}
