//! The broker connection over TLS, against a Mosquitto the test starts with a TLS listener
//! and certificates the test makes: devices and the gateway sync over mutual TLS; a client
//! that does not trust the broker's CA, or has no certificate of the right CA, is refused.

use std::path::PathBuf;
use std::time::Duration;

use driftless_core::protocol::{BrokerAddr, Tls};
use driftless_tests::pki::{Issued, TestCa};
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
