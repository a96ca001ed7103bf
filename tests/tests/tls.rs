//! The broker connection over TLS, against a Mosquitto the test starts with a TLS listener
//! and certificates the test makes: devices and the gateway sync over mutual TLS; a client
//! that does not trust the broker's CA, or has no certificate of the right CA, is refused.

use std::path::PathBuf;
use std::time::Duration;

use driftless_core::protocol::{BrokerAddr, Tls};
use driftless_tests::pki::{Issued, TestCa};
use driftless_tests::procs;
use driftless_tests::*;

const WAIT: Duration = Duration::from_secs(30);

fn over_tls(port: u16, ca: PathBuf, client: Option<&Issued>) -> BrokerAddr {
    let mut broker = BrokerAddr::plain("127.0.0.1", port);
    broker.tls = Some(Tls { ca: Some(ca), client: client.map(|c| (c.cert.clone(), c.key.clone())) });
    broker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_sync_over_mutual_tls_and_a_wrong_ca_or_no_certificate_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "fleet");
    let rogue = TestCa::new(dir.path(), "rogue");
    let served = ca.broker();
    let settings = format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nallow_anonymous true",
        ca.ca_file().display(),
        served.cert.display(),
        served.key.display()
    );
    let port = free_port();
    let Some(_broker) = OwnMosquitto::start_configured(port, dir.path(), &settings) else { return };

    let tenant = tenant("tls");
    let gw_cert = ca.issue("gateway", &[]);
    let gw = Gateway::start(&over_tls(port, ca.ca_file(), Some(&gw_cert)), &tenant, dir.path().join("gw.db")).await;
    let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
    let (cert_a, cert_b) = (ca.issue("tab-a", &[]), ca.issue("tab-b", &[]));
    let _agent_a = start_agent(&a, &over_tls(port, ca.ca_file(), Some(&cert_a)), &tenant, "tab-a").await;
    let _agent_b = start_agent(&b, &over_tls(port, ca.ca_file(), Some(&cert_b)), &tenant, "tab-b").await;
    exec(&a, "INSERT INTO inspections(id, site, stock) VALUES ('over-tls', 'x', 1)");
    eventually("b has a's row, through TLS", WAIT, || rows(&b, "SELECT id FROM inspections").len() == 1).await;

    // The right CA and a certificate of it: accepted (the control for what follows).
    try_connect("probe-ok", &over_tls(port, ca.ca_file(), Some(&cert_a))).await.expect("accepted");
    // A client that trusts another CA does not accept the broker.
    let wrong_ca = try_connect("probe-wrong-ca", &over_tls(port, rogue.ca_file(), Some(&cert_a))).await;
    let err = wrong_ca.expect_err("a client trusting another CA connected");
    assert!(err.contains("certificate"), "{err}");
    // A client without a certificate, or with one of another CA, is refused by the broker.
    let err = try_connect("probe-no-cert", &over_tls(port, ca.ca_file(), None)).await.expect_err("no certificate");
    assert!(err.contains("CertificateRequired"), "{err}");
    let forged = rogue.issue("tab-a", &[]);
    let err = try_connect("probe-rogue-cert", &over_tls(port, ca.ca_file(), Some(&forged))).await.expect_err("rogue");
    assert!(err.contains("UnknownCA"), "{err}");
    // Plain text to the TLS listener gets nowhere.
    assert!(try_connect("probe-plain", &BrokerAddr::plain("127.0.0.1", port)).await.is_err());
    gw.stop().await;
}

/// The embedded broker behind its guard, over mutual TLS with device passwords: devices sync;
/// a client trusting another CA, without a certificate, with one of another CA, in plain
/// text, or with a wrong password is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_serves_mutual_tls_with_device_passwords() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new(dir.path(), "fleet");
    let rogue = TestCa::new(dir.path(), "rogue");
    let served = ca.broker();
    let gw_db = dir.path().join("gw.db");
    let db = gw_db.to_str().expect("utf-8 path");
    let tenant = tenant("tls-emb");
    let add = |device: &str| {
        let out = procs::gateway_ok(&["device", "add", "--tenant", &tenant, "--device", device, "--db", db]);
        let line = out.lines().find_map(|l| l.strip_prefix("broker password: ")).expect("a password");
        line.trim().to_owned()
    };
    let (pw_a, pw_b) = (add("tab-a"), add("tab-b"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (cert, key, client_ca) = (served.cert.display().to_string(), served.key.display().to_string(), ca.ca_file());
    let extra = [
        "--embedded-broker",
        "--embedded-broker-auth",
        "--listen",
        &listen,
        "--embedded-broker-cert",
        &cert,
        "--embedded-broker-key",
        &key,
        "--embedded-broker-client-ca",
        client_ca.to_str().expect("utf-8 path"),
    ];
    let _gw = procs::gateway_as("gw-tls-emb", &BrokerAddr::plain("127.0.0.1", port), &tenant, &gw_db, &extra);
    let (cert_a, cert_b) = (ca.issue("tab-a", &[]), ca.issue("tab-b", &[]));
    let login = |device: &str, pw: &str, cert: Option<&Issued>, trusted: PathBuf| {
        over_tls(port, trusted, cert).with_login(format!("{tenant}/{device}"), pw)
    };
    let (a, b) = (device_db(dir.path(), "a"), device_db(dir.path(), "b"));
    let _agent_a = start_agent(&a, &login("tab-a", &pw_a, Some(&cert_a), ca.ca_file()), &tenant, "tab-a").await;
    let _agent_b = start_agent(&b, &login("tab-b", &pw_b, Some(&cert_b), ca.ca_file()), &tenant, "tab-b").await;
    exec(&a, "INSERT INTO inspections(id, site, stock) VALUES ('over-tls', 'x', 1)");
    eventually("b has a's row, through TLS", WAIT, || rows(&b, "SELECT id FROM inspections").len() == 1).await;

    let id = driftless_core::protocol::client_id(&tenant, "tab-a");
    try_connect(&id, &login("tab-a", &pw_a, Some(&cert_a), ca.ca_file())).await.expect("the control is accepted");
    let err = try_connect(&id, &login("tab-a", &pw_a, Some(&cert_a), rogue.ca_file())).await.expect_err("wrong CA");
    assert!(err.contains("certificate"), "{err}");
    let err = try_connect(&id, &login("tab-a", &pw_a, None, ca.ca_file())).await.expect_err("no certificate");
    assert!(err.contains("CertificateRequired"), "{err}");
    let forged = rogue.issue("tab-a", &[]);
    let err = try_connect(&id, &login("tab-a", &pw_a, Some(&forged), ca.ca_file())).await.expect_err("rogue cert");
    assert!(err.contains("UnknownCA"), "{err}");
    let plain = BrokerAddr::plain("127.0.0.1", port).with_login(format!("{tenant}/tab-a"), &pw_a);
    assert!(try_connect(&id, &plain).await.is_err(), "plain text got in");
    let err = try_connect(&id, &login("tab-a", &pw_b, Some(&cert_a), ca.ca_file())).await.expect_err("b's password");
    assert!(err.contains("refused"), "{err}");
}
