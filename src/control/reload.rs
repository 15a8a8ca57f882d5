//! `reload`: reads the config file again (as SIGHUP does). Takes no arguments. Answers what
//! was left for a restart; an invalid file is `failed` with every problem (the running config
//! stays).

use serde_json::{Value, json};

use super::Services;

pub fn run(svc: &Services) -> Result<Value, String> {
    match svc.live.reload() {
        Ok(st) => Ok(json!({"reloaded": true, "needs_restart": st.needs_restart})),
        Err(st) => Err(format!(
            "the new config is invalid; the running one stays: {}",
            st.problems.join("; ")
        )),
    }
}
