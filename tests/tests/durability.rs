//! Invariant 1 (DESIGN.md): a 2xx means durable. The gateway is killed with SIGKILL while clients
//! submit; after a restart every acknowledged record is there, unchanged, and retrying the
//! unacknowledged ones with the same X-Request-Id never creates a duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use caregate_e2e::{Gateway, observation};
use reqwest::{Method, StatusCode};
use tokio::sync::Mutex;

const CLIENTS: usize = 8;
const ACKS_BEFORE_KILL: usize = 120;
const ROUNDS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn f1_sigkill_during_ingest_loses_no_acknowledged_record() {
    let mut gw = Gateway::start();
    // request id -> (location, systolic value) for every 201 the clients saw.
    let mut acknowledged: HashMap<String, (String, u32)> = HashMap::new();
    let mut unacknowledged: Vec<(String, u32)> = Vec::new();

    for round in 0..ROUNDS {
        let token = gw.token("gp-a81001").await;
        let acked = Arc::new(Mutex::new(Vec::<(String, String, u32)>::new()));
        let failed = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for client in 0..CLIENTS {
            let (client_http, base, token) =
                (gw.client.clone(), gw.base_url.clone(), token.clone());
            let (acked, failed, count) = (acked.clone(), failed.clone(), count.clone());
            tasks.push(tokio::spawn(async move {
                for n in 0u32.. {
                    let value = 100 + n;
                    let request_id = format!("r{round}-c{client}-n{n}");
                    let body = observation("9434765919", f64::from(value)).to_string();
                    let sent = client_http
                        .post(format!("{base}/fhir/Observation"))
                        .bearer_auth(&token)
                        .header("content-type", "application/fhir+json")
                        .header("x-request-id", &request_id)
                        .body(body)
                        .send()
                        .await;
                    match sent {
                        Ok(response) if response.status() == StatusCode::CREATED => {
                            let location =
                                response.headers()["location"].to_str().unwrap().to_owned();
                            acked.lock().await.push((request_id, location, value));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(response) => panic!("unexpected status {}", response.status()),
                        Err(_) => {
                            // The server died mid-request: outcome unknown, not acknowledged.
                            failed.lock().await.push((request_id, value));
                            return;
                        }
                    }
                }
            }));
        }
        while count.load(Ordering::SeqCst) < ACKS_BEFORE_KILL {
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        gw.kill();
        for task in tasks {
            task.await.unwrap();
        }
        for (request_id, location, value) in acked.lock().await.drain(..) {
            acknowledged.insert(request_id, (location, value));
        }
        unacknowledged.extend(failed.lock().await.drain(..));
        gw.launch();
    }

    let token = gw.token("gp-a81001").await;
    assert!(acknowledged.len() >= ROUNDS * ACKS_BEFORE_KILL);
    for (location, value) in acknowledged.values() {
        let path = location
            .split("/fhir/")
            .nth(1)
            .unwrap()
            .split("/_history")
            .next()
            .unwrap();
        let reply = gw
            .send(
                Method::GET,
                &format!("/fhir/{path}"),
                Some(&token),
                None,
                &[],
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "acknowledged {path} is missing after SIGKILL"
        );
        assert_eq!(
            reply.body["valueQuantity"]["value"].as_f64(),
            Some(f64::from(*value))
        );
    }
    // Retrying an unacknowledged request with its X-Request-Id is safe: one record either way.
    for (request_id, value) in &unacknowledged {
        let body = observation("9434765919", f64::from(*value))
            .to_string()
            .into_bytes();
        let headers = [("x-request-id", request_id.as_str())];
        let first = gw
            .send(
                Method::POST,
                "/fhir/Observation",
                Some(&token),
                Some(body.clone()),
                &headers,
            )
            .await;
        let second = gw
            .send(
                Method::POST,
                "/fhir/Observation",
                Some(&token),
                Some(body),
                &headers,
            )
            .await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert_eq!(first.header("location"), second.header("location"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_requests_and_exits_cleanly() {
    let mut gw = Gateway::start();
    let token = gw.token("trust-rx1").await;
    let mut in_flight = Vec::new();
    for n in 0..20 {
        let (client, base, token) = (gw.client.clone(), gw.base_url.clone(), token.clone());
        in_flight.push(tokio::spawn(async move {
            client
                .post(format!("{base}/fhir/Observation"))
                .bearer_auth(&token)
                .header("content-type", "application/fhir+json")
                .body(observation("9434765919", f64::from(200 + n)).to_string())
                .send()
                .await
                .map(|r| r.status())
        }));
    }
    // Wait until the first of them has been answered, so the rest are in flight or queued.
    let first = in_flight.remove(0).await.unwrap();
    assert_eq!(first.unwrap(), StatusCode::CREATED);
    assert!(gw.terminate().await, "caregate exits 0 after SIGTERM");
    // Every request either completed with 201, or was refused before it was accepted (connection
    // error) — none was cut off after being acknowledged, which the F1 test covers.
    for task in in_flight {
        if let Ok(status) = task.await.unwrap() {
            assert_eq!(status, StatusCode::CREATED);
        }
    }
}
