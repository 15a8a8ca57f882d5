//! Layer 5: the agent's health as others see it: the live status board, the status document
//! (`edgesync status`, the socket's `status`, `P/D/status`) and the metrics (`P/D/metrics`,
//! the Prometheus text file).

pub mod metrics;
pub mod status;
