//! Polling with a deadline, for conditions that become true "soon" (a broker is up, a
//! counter reached a value). Never a fixed sleep.

use std::time::{Duration, Instant};

use crate::Result;

/// How long to sleep between two polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Calls `cond` every 10 ms until it returns true; fails with a message naming the timeout
/// after `timeout`. `cond` is always called at least once, and once more at the deadline.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("condition not met within {timeout:?}").into());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`wait_until`] for async code: sleeps with `tokio::time::sleep`, so it does not block the
/// runtime (and honours paused time).
pub async fn wait_until_async(timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("condition not met within {timeout:?}").into());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn wait_until_returns_when_condition_holds() {
        let n = AtomicU32::new(0);
        wait_until(Duration::from_secs(5), || {
            n.fetch_add(1, Ordering::Relaxed) >= 3
        })
        .unwrap();
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn wait_until_times_out_with_a_message() {
        let err = wait_until(Duration::from_millis(30), || false).unwrap_err();
        assert!(err.to_string().contains("not met within"), "{err}");
    }

    #[tokio::test]
    async fn wait_until_async_times_out() {
        let err = wait_until_async(Duration::from_millis(30), || false)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("30ms"), "{err}");
    }
}
