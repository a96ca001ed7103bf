//! Where an MQTT broker listens and how to reach it, parsed from a URL:
//! `mqtt://[USER:PASSWORD@]HOST[:PORT]` in plain text (loopback and tests), or
//! `mqtts://[USER:PASSWORD@]HOST[:PORT][?ca=FILE&cert=FILE&key=FILE]` over TLS, verified
//! against the CA in `ca` (or the system's roots without it), with a client certificate for
//! mutual TLS when `cert` and `key` are given.

use std::fmt;
use std::path::PathBuf;

/// A broker and the way to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// TLS settings (`mqtts://`); `None`: plain text.
    pub tls: Option<Tls>,
    /// Username and password to connect with.
    pub login: Option<(String, String)>,
}

/// How a TLS connection is verified and who the client is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// PEM file of the CA(s) the broker's certificate must chain to; `None`: the system's.
    pub ca: Option<PathBuf>,
    /// PEM files of the client's certificate chain and private key (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
}

impl BrokerAddr {
    /// A plain-text broker without credentials.
    pub fn plain(host: impl Into<String>, port: u16) -> BrokerAddr {
        BrokerAddr { host: host.into(), port, tls: None, login: None }
    }

    /// The same broker, reached with these credentials.
    pub fn with_login(mut self, user: impl Into<String>, password: impl Into<String>) -> BrokerAddr {
        self.login = Some((user.into(), password.into()));
        self
    }
}

/// The password never shows in logs or errors.
impl fmt::Debug for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerAddr")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("user", &self.login.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        let user = self.login.as_ref().map_or(String::new(), |(u, _)| format!("{u}@"));
        write!(f, "{scheme}://{user}{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for BrokerAddr {
    type Err = String;
    fn from_str(url: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://").or_else(|| url.strip_prefix("ssl://")) {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://").or_else(|| url.strip_prefix("tcp://")) {
            (false, rest)
        } else {
            return Err("expected mqtt://HOST:PORT or mqtts://HOST:PORT".to_owned());
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let rest = rest.trim_end_matches('/');
        let (login, rest) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                if user.is_empty() {
                    return Err("an empty user name".to_owned());
                }
                (Some((user.to_owned(), password.to_owned())), hostport)
            }
            None => (None, rest),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
            _ => (rest, default_port),
        };
        if host.is_empty() || host.contains(['/', '@', ' ']) {
            return Err(format!("bad host {host:?}"));
        }
        let mut settings = Tls::default();
        let (mut cert, mut key) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').ok_or_else(|| format!("bad query part {pair:?}"))?;
            if !tls {
                return Err(format!("{name:?} is a TLS setting: use mqtts://"));
            }
            match name {
                "ca" => settings.ca = Some(PathBuf::from(value)),
                "cert" => cert = Some(PathBuf::from(value)),
                "key" => key = Some(PathBuf::from(value)),
                other => return Err(format!("unknown setting {other:?} (ca, cert, key)")),
            }
        }
        settings.client = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err("a client certificate needs both cert= and key=".to_owned()),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        Ok(BrokerAddr { host, port, tls: tls.then_some(settings), login })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_or_explain() {
        assert_eq!("mqtt://127.0.0.1:1883".parse(), Ok(BrokerAddr::plain("127.0.0.1", 1883)));
        assert_eq!("tcp://broker".parse(), Ok(BrokerAddr::plain("broker", 1883)));
        assert!("http://x:1".parse::<BrokerAddr>().is_err());
        assert!("mqtt://x:99999".parse::<BrokerAddr>().is_err());
        assert!("mqtt://:1883".parse::<BrokerAddr>().is_err());
        assert!("mqtt://x?ca=/a.pem".parse::<BrokerAddr>().is_err(), "TLS settings need mqtts");
        assert!("mqtts://x?cert=/c.pem".parse::<BrokerAddr>().is_err(), "a certificate needs its key");
        assert!("mqtts://x?colour=red".parse::<BrokerAddr>().is_err());
    }

    #[test]
    fn tls_and_credentials_come_from_the_url() {
        let b: BrokerAddr =
            "mqtts://tab-1:s3cr:et@broker.example:8884?ca=/etc/ca.pem&cert=/c.pem&key=/k.pem".parse().expect("parses");
        assert_eq!((b.host.as_str(), b.port), ("broker.example", 8884));
        assert_eq!(b.login, Some(("tab-1".into(), "s3cr:et".into())));
        let tls = b.tls.clone().expect("tls");
        assert_eq!(tls.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(tls.client, Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem"))));
        assert_eq!(b.to_string(), "mqtts://tab-1@broker.example:8884");
        assert!(!format!("{b:?}").contains("s3cr"), "the password never shows");
        let d: BrokerAddr = "mqtts://broker".parse().expect("parses");
        assert_eq!((d.port, d.tls, d.login), (8883, Some(Tls::default()), None));
        assert_eq!("mqtt://[::1]:1884".parse(), Ok(BrokerAddr::plain("::1", 1884)));
    }
}
