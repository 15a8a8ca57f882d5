//! The clustered broker is a cluster: a publish on one node reaches a subscriber on another,
//! a node sharing sessions hands a persistent session (and the QoS 1 message queued while
//! its client was away) to another node, a node that does not share starts it empty, and a
//! killed node comes back on its port.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use edgesync_testkit::connect::Connect;
use edgesync_testkit::{Cluster, Sharing, TestPki};
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};

fn client(
    c: &Cluster,
    pki: &TestPki,
    node: usize,
    id: &str,
    clean: bool,
) -> (AsyncClient, EventLoop) {
    let (cert, key) = pki.issue_client(id, id).expect("client certificate");
    let connect = Connect::tls("localhost", c.addr(node).port(), pki.ca.clone(), cert, key);
    let mut opts = connect.mqtt_options(id).expect("options");
    opts.set_clean_session(clean);
    opts.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(opts, 64)
}

/// Polls until CONNACK; returns its session-present flag.
async fn connack(ev: &mut EventLoop) -> bool {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => return a.session_present,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => panic!("no CONNACK within 20 s"),
        }
    }
}

async fn until<T>(ev: &mut EventLoop, mut f: impl FnMut(&Packet) -> Option<T>) -> T {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ev.poll()).await {
            Ok(Ok(Event::Incoming(p))) => {
                if let Some(t) = f(&p) {
                    return t;
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => panic!("nothing within 20 s"),
        }
    }
}

fn suback(p: &Packet) -> Option<()> {
    matches!(p, Packet::SubAck(_)).then_some(())
}

fn publish(p: &Packet) -> Option<Vec<u8>> {
    match p {
        Packet::Publish(p) => Some(p.payload.to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_route_share_sessions_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = TestPki::generate(dir.path()).expect("pki");
    let Some(mut c) =
        Cluster::start(&pki, &[Sharing::Redis, Sharing::Redis, Sharing::None]).expect("cluster")
    else {
        return;
    };

    // Routing: subscribe on node 0, publish on node 1.
    let (sub, mut sub_ev) = client(&c, &pki, 0, "sub", false);
    assert!(!connack(&mut sub_ev).await, "a new client has no session");
    sub.subscribe("t/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    until(&mut sub_ev, suback).await;
    let (publ, mut pub_ev) = client(&c, &pki, 1, "pub", true);
    connack(&mut pub_ev).await;
    let pump = tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    publ.publish("t/a", QoS::AtLeastOnce, false, b"one".to_vec())
        .await
        .expect("publish");
    assert_eq!(until(&mut sub_ev, publish).await, b"one");

    // Session sharing: the subscriber goes away (node 0 killed), a message is published for
    // it, it comes back on node 1 and finds its session and the message.
    c.kill(0).expect("kill node 0");
    drop(sub_ev);
    publ.publish("t/b", QoS::AtLeastOnce, false, b"two".to_vec())
        .await
        .expect("publish");
    // Acknowledged by node 1, so stored for the absent session.
    let (_sub1, mut sub1_ev) = client(&c, &pki, 1, "sub", false);
    assert!(
        connack(&mut sub1_ev).await,
        "node 1 shares the session made on node 0"
    );
    // "one" may come again first: its PUBACK had not left when node 0 died (QoS 1).
    until(&mut sub1_ev, |p| publish(p).filter(|m| m == b"two")).await;
    drop(sub1_ev);

    // A node that does not share sessions: the same client starts empty there.
    let (_sub2, mut sub2_ev) = client(&c, &pki, 2, "sub", false);
    assert!(
        !connack(&mut sub2_ev).await,
        "node 2 keeps no shared sessions"
    );
    drop(sub2_ev);

    // A killed node comes back on its port; the whole cluster restarts.
    c.start_node(0).expect("node 0 again");
    c.restart_all().expect("restart");
    let (_sub3, mut sub3_ev) = client(&c, &pki, 0, "sub", false);
    assert!(
        connack(&mut sub3_ev).await,
        "Redis keeps sessions across a cluster restart"
    );
    pump.abort();
}
