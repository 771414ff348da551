//! `local.acl_file`: who may publish and subscribe to what, in mosquitto's format.
//!
//! ```text
//! # rules before any `user` line are for anonymous clients
//! topic read public/#
//! user alice
//! topic readwrite warehouse/#
//! topic deny warehouse/+/fan/command
//! # patterns apply to every client: %u is its user name, %c its client id
//! pattern write devices/%u/#
//! ```
//!
//! Checked as mosquitto does: a client's own rules first, then the patterns; in each list
//! `deny` rules first; the first rule that matches decides; nothing matching is denied.
//! Wildcards at the start of a rule do not match `$` topics. A subscription filter is
//! allowed when a rule granting `read` covers every topic it can match and no `deny`
//! rule covers it; messages on topics a `deny` rule matches are withheld at delivery.

use std::collections::HashMap;
use std::path::Path;

use crate::topics;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    read: bool,
    write: bool,
}

impl Grant {
    const DENY: Grant = Grant {
        read: false,
        write: false,
    };

    fn is_deny(self) -> bool {
        self == Grant::DENY
    }

    fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    grant: Grant,
    filter: String,
}

/// A parsed ACL file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct AclError {
    pub line: usize,
    pub message: String,
}

impl AclFile {
    pub fn load(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path).map_err(|e| AclError {
            line: 0,
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Result<Self, AclError> {
        let mut acl = AclFile::default();
        let mut user: Option<String> = None;
        for (i, line) in text.lines().enumerate() {
            let error = |message: String| AclError {
                line: i + 1,
                message,
            };
            let line = line.trim_end();
            if line.trim_start().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (word, rest) = split_word(line.trim_start());
            match word {
                "user" => {
                    let name = rest.trim();
                    if name.is_empty() {
                        return Err(error("`user` without a user name".into()));
                    }
                    user = Some(name.to_owned());
                }
                "topic" | "pattern" => {
                    let (first, after) = split_word(rest.trim_start());
                    let (grant, filter) = match (access(first), after.trim()) {
                        (Some(grant), filter) if !filter.is_empty() => (grant, filter),
                        (None, "") => (Grant { read: true, write: true }, first),
                        (Some(_), _) => return Err(error(format!("`{word} {first}` without a topic"))),
                        (None, _) => {
                            return Err(error(format!(
                                "{first:?} is not an access type; use read, write, readwrite or deny"
                            )))
                        }
                    };
                    if filter.is_empty() {
                        return Err(error(format!("`{word}` without a topic")));
                    }
                    if let Err(why) = topics::valid_filter(filter) {
                        return Err(error(format!("{filter:?} is not a topic filter: it {why}")));
                    }
                    let rule = Rule {
                        grant,
                        filter: filter.to_owned(),
                    };
                    let list = match (word, &user) {
                        ("pattern", _) => &mut acl.patterns,
                        (_, None) => &mut acl.anonymous,
                        (_, Some(name)) => acl.users.entry(name.clone()).or_default(),
                    };
                    list.push(rule);
                }
                other => {
                    return Err(error(format!(
                        "{other:?} is not an ACL line; lines start with user, topic or pattern (or # for a comment)"
                    )))
                }
            }
        }
        for list in acl.users.values_mut() {
            deny_first(list);
        }
        deny_first(&mut acl.anonymous);
        deny_first(&mut acl.patterns);
        Ok(acl)
    }

    /// The rules of one client, with `%u` and `%c` filled in: compiled once per
    /// connection (and again after the file is reloaded), then checked per packet.
    pub fn rules_for(&self, username: Option<&str>, client_id: &str) -> ClientRules {
        let own = match username {
            Some(name) => self.users.get(name).cloned().unwrap_or_default(),
            None => self.anonymous.clone(),
        };
        // A user name or client id with a wildcard or '/' would make a pattern match
        // other clients' topics: such a client gets no pattern rules at all.
        let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
        let patterns_usable = !unsafe_value(client_id) && !username.is_some_and(unsafe_value);
        let patterns = match patterns_usable {
            true => self
                .patterns
                .iter()
                .filter_map(|rule| {
                    let filter = substitute(&rule.filter, username, client_id)?;
                    Some(Rule {
                        grant: rule.grant,
                        filter,
                    })
                })
                .collect(),
            false => Vec::new(),
        };
        ClientRules { own, patterns }
    }
}

/// mosquitto checks `deny` rules before the others of the same list.
fn deny_first(list: &mut [Rule]) {
    list.sort_by_key(|rule| !rule.grant.is_deny());
}

fn access(word: &str) -> Option<Grant> {
    Some(match word {
        "read" => Grant {
            read: true,
            write: false,
        },
        "write" => Grant {
            read: false,
            write: true,
        },
        "readwrite" => Grant {
            read: true,
            write: true,
        },
        "deny" => Grant::DENY,
        _ => return None,
    })
}

fn split_word(s: &str) -> (&str, &str) {
    s.split_once([' ', '\t']).unwrap_or((s, ""))
}

/// The pattern with whole levels `%u` and `%c` replaced; None when it needs a user name
/// and the client has none.
fn substitute(pattern: &str, username: Option<&str>, client_id: &str) -> Option<String> {
    let mut out = String::with_capacity(pattern.len() + 16);
    for (i, level) in pattern.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        match level {
            "%u" => out.push_str(username?),
            "%c" => out.push_str(client_id),
            other => out.push_str(other),
        }
    }
    Some(out)
}

/// One client's rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRules {
    own: Vec<Rule>,
    patterns: Vec<Rule>,
}

impl ClientRules {
    /// Whether the client may publish to (`Write`) or receive from (`Read`) `topic`.
    pub fn topic_allowed(&self, topic: &str, access: Access) -> bool {
        for list in [&self.own, &self.patterns] {
            for rule in list {
                if topics::matches(&rule.filter, topic) {
                    if rule.grant.is_deny() {
                        return false;
                    }
                    if rule.grant.allows(access) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Whether the client may subscribe to `filter` (`$share/GROUP/` stripped).
    pub fn filter_allowed(&self, filter: &str) -> bool {
        let filter = shared_filter(filter);
        for list in [&self.own, &self.patterns] {
            for rule in list {
                if covers(&rule.filter, filter) {
                    if rule.grant.is_deny() {
                        return false;
                    }
                    if rule.grant.read {
                        return true;
                    }
                }
            }
        }
        false
    }
}

/// The filter of a shared subscription `$share/GROUP/FILTER`, else `filter` itself.
pub fn shared_filter(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, inner)| inner)
}

/// Whether every topic `filter` can match is matched by `rule`.
pub fn covers(rule: &str, filter: &str) -> bool {
    if filter.starts_with('$') && rule.starts_with(['+', '#']) {
        return false;
    }
    let mut rule_levels = rule.split('/');
    let mut filter_levels = filter.split('/');
    loop {
        match (rule_levels.next(), filter_levels.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(r), Some(f)) if r == f && r != "+" && r != "#" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous clients
topic read public/#

user alice
topic readwrite warehouse/#
topic deny warehouse/+/fan/command
topic write lab/alice

user bob
topic warehouse/zone1/#

pattern readwrite devices/%u/#
pattern write clients/%c/status
";

    fn rules(user: Option<&str>, client: &str) -> ClientRules {
        AclFile::parse(FILE).unwrap().rules_for(user, client)
    }

    #[test]
    fn users_get_their_rules_and_denies_come_first() {
        let alice = rules(Some("alice"), "a1");
        assert!(alice.topic_allowed("warehouse/zone1/temp", Access::Write));
        assert!(!alice.topic_allowed("warehouse/zone1/fan/command", Access::Write));
        assert!(!alice.topic_allowed("warehouse/zone1/fan/command", Access::Read));
        assert!(alice.topic_allowed("lab/alice", Access::Write));
        assert!(!alice.topic_allowed("lab/alice", Access::Read));
        assert!(!alice.topic_allowed("public/news", Access::Read));
        let bob = rules(Some("bob"), "b1");
        assert!(bob.topic_allowed("warehouse/zone1/fan/command", Access::Write));
        assert!(!bob.topic_allowed("warehouse/zone2/temp", Access::Write));
        let anonymous = rules(None, "x");
        assert!(anonymous.topic_allowed("public/news", Access::Read));
        assert!(!anonymous.topic_allowed("public/news", Access::Write));
        let stranger = rules(Some("mallory"), "m");
        assert!(!stranger.topic_allowed("public/news", Access::Read));
    }

    #[test]
    fn patterns_fill_in_user_and_client() {
        let carol = rules(Some("carol"), "c-7");
        assert!(carol.topic_allowed("devices/carol/temp", Access::Write));
        assert!(!carol.topic_allowed("devices/dave/temp", Access::Write));
        assert!(carol.topic_allowed("clients/c-7/status", Access::Write));
        assert!(!carol.topic_allowed("clients/c-8/status", Access::Write));
        let anonymous = rules(None, "c-9");
        assert!(!anonymous.topic_allowed("devices/%u/temp", Access::Write));
        assert!(anonymous.topic_allowed("clients/c-9/status", Access::Write));
        let sneaky = rules(Some("#"), "c-1");
        assert!(!sneaky.topic_allowed("devices/anyone/temp", Access::Write));
        assert!(!sneaky.topic_allowed("clients/c-1/status", Access::Write));
    }

    #[test]
    fn filters_must_be_covered_by_a_read_rule() {
        let alice = rules(Some("alice"), "a1");
        assert!(alice.filter_allowed("warehouse/#"));
        assert!(alice.filter_allowed("warehouse/+/temp"));
        assert!(!alice.filter_allowed("#"));
        assert!(!alice.filter_allowed("+/zone1/temp"));
        assert!(!alice.filter_allowed("warehouse/zone1/fan/command"));
        assert!(!alice.filter_allowed("lab/alice"));
        assert!(alice.filter_allowed("$share/g/warehouse/zone1/temp"));
        let bob = rules(Some("bob"), "b1");
        assert!(bob.filter_allowed("warehouse/zone1/+"));
        assert!(!bob.filter_allowed("warehouse/+/temp"));
    }

    #[test]
    fn wildcards_at_the_start_do_not_reach_dollar_topics() {
        let acl = AclFile::parse("user root\ntopic readwrite #\n").unwrap();
        let root = acl.rules_for(Some("root"), "r");
        assert!(root.topic_allowed("a/b", Access::Write));
        assert!(!root.topic_allowed("$SYS/broker", Access::Read));
        assert!(!root.filter_allowed("$SYS/#"));
        assert!(covers("#", "#") && covers("a/+", "a/+") && !covers("a/+", "a/#"));
        assert!(covers("a/#", "a") && !covers("a", "a/#"));
    }

    #[test]
    fn mistakes_are_reported_with_their_line() {
        let error = AclFile::parse("user a\ntopic reed x\n").unwrap_err();
        assert_eq!(error.line, 2);
        assert!(error.message.contains("access type"), "{error}");
        assert_eq!(AclFile::parse("topic read a/#/b\n").unwrap_err().line, 1);
        assert_eq!(AclFile::parse("\n\nuser\n").unwrap_err().line, 3);
        assert!(AclFile::parse("allow all\n").is_err());
    }
}
