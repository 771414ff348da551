//! `cloud.url`: `mqtt://host[:port]` (plain TCP, port 1883 by default) or
//! `mqtts://host[:port]` (TLS, port 8883 by default).

use std::net::Ipv6Addr;

use super::CloudUrl;

const ACCEPTED: &str = "accepted: mqtt://host[:port] (plain TCP, default port 1883) \
                        or mqtts://host[:port] (TLS, default port 8883)";

pub fn parse(url: &str) -> Result<CloudUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} is not an MQTT URL; {ACCEPTED}"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains('@') {
        return Err(format!(
            "{url:?} holds credentials; set cloud.username and cloud.password_file instead"
        ));
    }
    if authority.contains(['/', '?', '#']) {
        return Err(format!(
            "{url:?} has a path or query, which MQTT has no use for; {ACCEPTED}"
        ));
    }
    let (host, port) =
        split_host_port(authority).map_err(|why| format!("{url:?}: {why}; {ACCEPTED}"))?;
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => {
                return Err(format!(
                    "{url:?}: port {text:?} is not a number from 1 to 65535"
                ))
            }
        },
    };
    Ok(CloudUrl { tls, host, port })
}

/// Splits `host[:port]`; an IPv6 address comes in brackets and leaves them.
fn split_host_port(authority: &str) -> Result<(String, Option<&str>), String> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (address, after) = bracketed
            .split_once(']')
            .ok_or("'[' without a closing ']'")?;
        address
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("{address:?} in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or("only ':port' may follow ']'")?,
            ),
        };
        return Ok((address.to_owned(), port));
    }
    let (host, port) = match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if port.is_some_and(|p| p.contains(':')) {
        return Err("an IPv6 address must be written in brackets, like [2001:db8::1]".into());
    }
    let host_chars_ok = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if host.is_empty() || !host_chars_ok {
        return Err(format!("{host:?} is not a host name or IP address"));
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: &str, port: u16) -> Result<CloudUrl, String> {
        Ok(CloudUrl {
            tls,
            host: host.into(),
            port,
        })
    }

    #[test]
    fn accepted_urls() {
        assert_eq!(
            parse("mqtt://broker.local"),
            url(false, "broker.local", 1883)
        );
        assert_eq!(
            parse("mqtts://iot.example.com"),
            url(true, "iot.example.com", 8883)
        );
        assert_eq!(
            parse("mqtts://iot.example.com:8884/"),
            url(true, "iot.example.com", 8884)
        );
        assert_eq!(
            parse("mqtt://127.0.0.1:1884"),
            url(false, "127.0.0.1", 1884)
        );
        assert_eq!(parse("mqtt://[::1]:1885"), url(false, "::1", 1885));
        assert_eq!(
            parse("mqtts://[2001:db8::1]"),
            url(true, "2001:db8::1", 8883)
        );
    }

    #[test]
    fn refused_urls_say_what_is_accepted() {
        for bad in [
            "tcp://x:1883",
            "ssl://x",
            "wss://x/mqtt",
            "x:1883",
            "MQTT://x",
            "",
        ] {
            let error = parse(bad).unwrap_err();
            assert!(
                error.contains("accepted: mqtt://host[:port]"),
                "{bad}: {error}"
            );
        }
        for bad in [
            "mqtt://",
            "mqtt://:1883",
            "mqtt://a b",
            "mqtt://::1",
            "mqtt://[::1",
            "mqtt://[zz]:1",
            "mqtt://[::1]x",
            "mqtt://x/path",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert!(parse("mqtt://x:0").unwrap_err().contains("port \"0\""));
        assert!(parse("mqtt://x:65536").unwrap_err().contains("1 to 65535"));
        assert!(parse("mqtt://x:").unwrap_err().contains("port \"\""));
        assert!(parse("mqtt://user:pw@x")
            .unwrap_err()
            .contains("cloud.username"));
    }
}
