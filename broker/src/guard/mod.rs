//! The planner guard (`[guard]`, off by default): rolls back planner
//! scaling decisions that keep the fleet overloaded (KV-cache usage or
//! prefill queue depth over a threshold for `consecutive` intervals).
//! `core.rs` judges (sans-IO), `load.rs` decodes the load reports,
//! `planner_store.rs` reads and writes the planner's etcd keys,
//! `election.rs` picks one acting relay per namespace, `task.rs` is the
//! shell (one task per namespace) and `view.rs` what status shows.

pub mod core;
pub mod election;
pub mod load;
pub mod planner_store;
pub mod task;
pub mod view;

use crate::config::{GuardConfig, GuardMode};
use crate::keys::etcd::link::EtcdLink;
use crate::messaging::nats::link::NatsLink;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use view::GuardView;

/// The guard's per-namespace views, for the status document.
#[derive(Clone, Default)]
pub struct GuardHandle {
    views: Arc<Vec<Arc<Mutex<GuardView>>>>,
}

impl GuardHandle {
    /// A copy of every namespace's view.
    pub fn views(&self) -> Vec<GuardView> {
        self.views
            .iter()
            .filter_map(|view| view.lock().ok().map(|view| view.clone()))
            .collect()
    }
}

/// Starts one task per namespace; returns at once, with the tasks (which
/// end after `stop`, once they gave their elections up).
pub fn start(
    config: &GuardConfig,
    relay_id: &str,
    nats: NatsLink,
    etcd: EtcdLink,
    stop: CancellationToken,
) -> (GuardHandle, Vec<tokio::task::JoinHandle<()>>) {
    let mode = match config.mode {
        GuardMode::Enforce => "enforce",
        GuardMode::Advise => "advise",
    };
    let mut tasks = Vec::with_capacity(config.namespaces.len());
    let views: Vec<_> = config
        .namespaces
        .iter()
        .map(|namespace| {
            let view = Arc::new(Mutex::new(GuardView::new(namespace, mode)));
            let task = task::NamespaceTask {
                namespace: namespace.clone(),
                config: config.clone(),
                relay_id: relay_id.to_string(),
                nats: nats.clone(),
                etcd: etcd.clone(),
                view: view.clone(),
            };
            tasks.push(tokio::spawn(task.run(stop.clone())));
            view
        })
        .collect();
    let handle = GuardHandle {
        views: Arc::new(views),
    };
    (handle, tasks)
}
