//! `lockstep-operator`: the Kubernetes controller for `FTVirtualMachine`
//! (`ftvirtualmachines.lockstep.dev/v1alpha1`, short name `ftvm`).
//!
//! For every FTVirtualMachine it keeps one arbiter Lease, a primary and a backup agent Pod on
//! different nodes, and a Service that follows the primary. The agents fail over by themselves
//! through the Lease (the split-brain arbiter, see `lockstep-arbiter`); the operator follows: it
//! moves the `role` label to the Lease holder, removes replicas on lost nodes, and starts a new
//! backup elsewhere, so protection is restored in seconds rather than after the default eviction.
//!
//! Layout, in the order a newcomer should read it:
//! * [`crd`]: the resource types; the CRD YAML is generated from them (`crdgen`).
//! * [`decide`]: the reconcile rules, a pure function from observed state to a plan.
//! * [`resources`]: builders of the Lease, Pods and Service.
//! * [`controller`]: observe → decide → execute, status by server-side apply, events, finalizer,
//!   and the watches on Pods, Leases, Services and Nodes.
//! * [`telemetry`]: log bandwidth and execution lag, scraped from the primary agent's `/metrics`.
//! * [`leader`]: leader election of operator replicas on the arbiter's compare-and-swap.
//! * [`metrics`]: `/metrics` and `/healthz`.
//!
//! # Example
//!
//! ```
//! use lockstep_operator::crd::FTVirtualMachine;
//! let vm: FTVirtualMachine = serde_saphyr::from_str(r#"
//! apiVersion: lockstep.dev/v1alpha1
//! kind: FTVirtualMachine
//! metadata: { name: kv, namespace: default }
//! spec: { guest: kvstore, memoryMiB: 64 }
//! "#).unwrap();
//! assert!(vm.spec.validate().is_ok());
//! assert_eq!(vm.spec.vcpus, 1);
//! ```

pub mod channel;
pub mod controller;
pub mod crd;
pub mod decide;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod telemetry;
