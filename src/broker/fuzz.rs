//! The connection state machine under random input: several clients connect (every
//! protocol level, clean or resumed sessions, wills), publish, subscribe, acknowledge,
//! send garbage and damaged packets, hang up and come back, in random order, against one
//! in-process broker. Nothing may panic, the core's books must stay consistent, and
//! afterwards the broker must still serve a fresh client.
//!
//! proptest on the stable toolchain: CI runs a few hundred cases in seconds.

use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::codec::{
    Ack, Connect, Disconnect, Packet, Properties, Protocol, Publish, SubOptions, Subscribe,
    Unsubscribe, Will,
};
use super::testing::TestBroker;

const TOPICS: [&str; 5] = ["a", "a/b", "a/b/c", "$SYS/x", "b"];
const FILTERS: [&str; 8] = [
    "a",
    "a/+",
    "a/#",
    "#",
    "+/b",
    "$share/g/a/#",
    "$SYS/#",
    "a/#/b",
];

#[derive(Debug, Clone)]
enum Action {
    Connect {
        level: u8,
        clean: bool,
        expiry: u32,
        id: u8,
        will: Option<(u8, u8, bool, u32)>,
        keep_alive: u16,
    },
    Publish {
        topic: u8,
        qos: u8,
        retain: bool,
        packet_id: u16,
        alias: Option<u16>,
        expiry: Option<u32>,
        payload: usize,
    },
    Subscribe {
        filter: u8,
        options: u8,
        packet_id: u16,
        id: Option<u32>,
    },
    Unsubscribe {
        filter: u8,
        packet_id: u16,
    },
    Ack {
        kind: u8,
        packet_id: u16,
    },
    Ping,
    Disconnect {
        reason: u8,
        expiry: Option<u32>,
    },
    Garbage(Vec<u8>),
    /// The last packet this client sent, with one byte changed.
    Damage {
        at: usize,
        xor: u8,
    },
    Hangup,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (prop_oneof![Just(3u8), Just(4), Just(5)], any::<bool>(), prop_oneof![Just(0u32), Just(5), Just(u32::MAX)], 0u8..3,
            proptest::option::of((0u8..5, 0u8..3, any::<bool>(), 0u32..3)), 0u16..3)
            .prop_map(|(level, clean, expiry, id, will, keep_alive)| Action::Connect { level, clean, expiry, id, will, keep_alive }),
        5 => (0u8..5, 0u8..3, any::<bool>(), 1u16..8, proptest::option::of(0u16..4), proptest::option::of(0u32..3), 0usize..64)
            .prop_map(|(topic, qos, retain, packet_id, alias, expiry, payload)| Action::Publish { topic, qos, retain, packet_id, alias, expiry, payload }),
        3 => (0u8..8, any::<u8>(), 1u16..8, proptest::option::of(0u32..3))
            .prop_map(|(filter, options, packet_id, id)| Action::Subscribe { filter, options, packet_id, id }),
        1 => (0u8..8, 1u16..8).prop_map(|(filter, packet_id)| Action::Unsubscribe { filter, packet_id }),
        3 => (4u8..8, 1u16..8).prop_map(|(kind, packet_id)| Action::Ack { kind, packet_id }),
        1 => Just(Action::Ping),
        1 => (prop_oneof![Just(0u8), Just(4), Just(0x80)], proptest::option::of(0u32..10))
            .prop_map(|(reason, expiry)| Action::Disconnect { reason, expiry }),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(Action::Garbage),
        1 => (any::<usize>(), 1u8..).prop_map(|(at, xor)| Action::Damage { at, xor }),
        1 => Just(Action::Hangup),
    ]
}

/// One test client: its end of an in-memory connection and what it last sent.
struct Client {
    stream: Option<DuplexStream>,
    protocol: Protocol,
    last: Vec<u8>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        if let Some(stream) = self.stream.as_mut() {
            if stream.write_all(bytes).await.is_err() {
                self.stream = None;
            }
        }
        self.last = bytes.to_vec();
    }

    /// Reads whatever the broker sent, without waiting for more.
    async fn drain(&mut self) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.stream = None;
                    return;
                }
                Ok(Ok(_)) => continue,
                Err(_) => return,
            }
        }
    }
}

fn encode(action: &Action, protocol: Protocol) -> Option<Vec<u8>> {
    let v5 = protocol == Protocol::V5;
    let packet = match action {
        Action::Publish {
            topic,
            qos,
            retain,
            packet_id,
            alias,
            expiry,
            payload,
        } => {
            let payload = vec![b'x'; *payload];
            let props = Properties {
                topic_alias: alias.filter(|_| v5),
                message_expiry: expiry.filter(|_| v5),
                ..Properties::default()
            };
            let topic = TOPICS[*topic as usize];
            let topic = if props.topic_alias.is_some() && *packet_id % 2 == 0 {
                ""
            } else {
                topic
            };
            Packet::Publish(Publish {
                dup: false,
                qos: *qos,
                retain: *retain,
                topic,
                packet_id: if *qos > 0 { *packet_id } else { 0 },
                props,
                payload: &payload,
            })
            .to_vec(protocol)
        }
        Action::Subscribe {
            filter,
            options,
            packet_id,
            id,
        } => {
            let mut o = SubOptions::from_byte(*options);
            o.qos = o.qos.min(2);
            if !v5 {
                o = SubOptions {
                    qos: o.qos,
                    ..SubOptions::default()
                };
            }
            o.retain_handling = o.retain_handling.min(2);
            Packet::Subscribe(Subscribe {
                packet_id: *packet_id,
                props: Properties {
                    subscription_ids: id.filter(|_| v5).into_iter().collect(),
                    ..Properties::default()
                },
                filters: vec![(FILTERS[*filter as usize], o)],
            })
            .to_vec(protocol)
        }
        Action::Unsubscribe { filter, packet_id } => Packet::Unsubscribe(Unsubscribe {
            packet_id: *packet_id,
            props: Properties::default(),
            filters: vec![FILTERS[*filter as usize]],
        })
        .to_vec(protocol),
        Action::Ack { kind, packet_id } => {
            let ack = Ack::new(*packet_id);
            match kind {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                6 => Packet::PubRel(ack),
                _ => Packet::PubComp(ack),
            }
            .to_vec(protocol)
        }
        Action::Ping => Packet::PingReq.to_vec(protocol),
        Action::Disconnect { reason, expiry } => Packet::Disconnect(Disconnect {
            reason: if v5 { *reason } else { 0 },
            props: Properties {
                session_expiry: expiry.filter(|_| v5),
                ..Properties::default()
            },
        })
        .to_vec(protocol),
        Action::Garbage(bytes) => bytes.clone(),
        _ => return None,
    };
    Some(packet)
}

fn connect_packet(
    level: u8,
    clean: bool,
    expiry: u32,
    id: u8,
    will: Option<(u8, u8, bool, u32)>,
    keep_alive: u16,
) -> Vec<u8> {
    let client_id = format!("fuzz-{id}");
    let v5 = level == 5;
    let connect = Connect {
        level,
        clean_start: clean,
        keep_alive,
        props: Properties {
            session_expiry: Some(expiry).filter(|_| v5),
            receive_maximum: Some(2).filter(|_| v5),
            topic_alias_maximum: Some(2).filter(|_| v5),
            ..Properties::default()
        },
        client_id: &client_id,
        will: will.map(|(topic, qos, retain, delay)| Will {
            qos,
            retain,
            props: Properties {
                will_delay: Some(delay).filter(|_| v5),
                ..Properties::default()
            },
            topic: TOPICS[topic as usize % 3],
            payload: b"gone",
        }),
        username: None,
        password: None,
    };
    Packet::Connect(Box::new(connect)).to_vec(Protocol::V311)
}

async fn run(steps: Vec<(usize, Action)>) {
    let broker = TestBroker::start().await;
    let mut clients: Vec<Client> = (0..3)
        .map(|_| Client {
            stream: None,
            protocol: Protocol::V311,
            last: Vec::new(),
        })
        .collect();
    for (who, action) in steps {
        let client = &mut clients[who];
        match &action {
            Action::Connect {
                level,
                clean,
                expiry,
                id,
                will,
                keep_alive,
            } => {
                client.stream = Some(broker.connect());
                client.protocol = if *level == 5 {
                    Protocol::V5
                } else {
                    Protocol::V311
                };
                let bytes = connect_packet(*level, *clean, *expiry, *id, *will, *keep_alive);
                client.send(&bytes).await;
            }
            Action::Hangup => client.stream = None,
            Action::Damage { at, xor } => {
                let mut bytes = client.last.clone();
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= xor;
                }
                client.send(&bytes).await;
            }
            other => {
                if let Some(bytes) = encode(other, client.protocol) {
                    client.send(&bytes).await;
                }
            }
        }
        client.drain().await;
        tokio::task::yield_now().await;
    }
    for client in clients.iter_mut() {
        client.drain().await;
    }
    broker.check_books();
    drop(clients);
    broker.still_serves().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_broker_survives_any_conversation(steps in proptest::collection::vec((0usize..3, action()), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(steps));
    }
}

/// The canary itself works on a broker nobody disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_canary_flies_on_a_quiet_broker() {
    TestBroker::start().await.still_serves().await;
}
