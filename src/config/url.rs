//! `cloud.url`: `mqtt://host[:port]` (plain TCP, port 1883 by default) or
//! `mqtts://host[:port]` (TLS, port 8883 by default), or a list of them: the nodes of a
//! cloud broker cluster, tried in order.

use std::net::Ipv6Addr;

use super::CloudUrl;

const ACCEPTED: &str = "accepted: mqtt://host[:port] (plain TCP, default port 1883) \
                        or mqtts://host[:port] (TLS, default port 8883)";

/// One URL or a non-empty list of them, all plain or all TLS (one set of TLS files and
/// credentials serves every node).
pub fn parse_list(value: &toml::Value) -> Result<Vec<CloudUrl>, String> {
    let urls = match value {
        toml::Value::String(text) => vec![parse(text)?],
        toml::Value::Array(items) if !items.is_empty() => {
            let mut urls = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let text = item.as_str().ok_or_else(|| {
                    format!("entry {} is {item}, not a string; {ACCEPTED}", i + 1)
                })?;
                let url = parse(text).map_err(|why| format!("entry {}: {why}", i + 1))?;
                if urls.contains(&url) {
                    return Err(format!("entry {}: {text:?} is listed twice", i + 1));
                }
                urls.push(url);
            }
            urls
        }
        toml::Value::Array(_) => return Err(format!("is an empty list; {ACCEPTED}")),
        other => {
            return Err(format!(
                "is {other}; give one URL or a list of URLs, like url = [\"mqtts://a.example.com\", \"mqtts://b.example.com\"]"
            ))
        }
    };
    if urls.iter().any(|u| u.tls != urls[0].tls) {
        return Err(
            "mixes mqtt:// and mqtts://; all nodes of the list must use the same scheme".into(),
        );
    }
    Ok(urls)
}

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
    fn a_list_names_the_nodes_in_order() {
        let list = |text: &str| parse_list(&text.parse::<toml::Value>().unwrap()["url"]);
        assert_eq!(
            list(r#"url = ["mqtts://a", "mqtts://b:8884"]"#),
            Ok(vec![
                url(true, "a", 8883).unwrap(),
                url(true, "b", 8884).unwrap()
            ])
        );
        assert_eq!(
            list(r#"url = "mqtt://a""#),
            Ok(vec![url(false, "a", 1883).unwrap()])
        );
        assert!(list(r#"url = []"#).unwrap_err().contains("empty"));
        assert!(list(r#"url = ["mqtt://a", "mqtts://b"]"#)
            .unwrap_err()
            .contains("mixes"));
        assert!(list(r#"url = ["mqtt://a", "mqtt://a"]"#)
            .unwrap_err()
            .contains("twice"));
        assert!(list(r#"url = ["mqtt://a", 5]"#)
            .unwrap_err()
            .contains("entry 2"));
        assert!(list(r#"url = 5"#).is_err());
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
