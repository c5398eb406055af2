//! `collector:api/identity`: facts about this machine.

use super::HostState;
use super::collector::api::identity::Host;

impl Host for HostState {
    fn pc_id(&mut self) -> String {
        self.services.pc_id.clone()
    }
}

impl super::v0_2::collector::api::identity::Host for HostState {
    fn pc_id(&mut self) -> String {
        self.services.pc_id.clone()
    }
}
