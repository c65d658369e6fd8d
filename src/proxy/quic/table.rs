//! The QUIC flow table: flows in a slab, found by the client's address and
//! port or by a connection ID (SPEC §6.5).
//!
//! A flow is filed under its client address and under at most two
//! connection IDs: the DCID of the client's first Initial (what the client
//! sends to until the server answers) and the SCID of the server's latest
//! long-header packet (what the client sends to from then on, in long and
//! short headers). A datagram from an address no flow has is looked up by
//! its DCID: a long header says the DCID's length; a short header does not,
//! so each length some flow's server CID has is tried (at most 21).
//!
//! A flow's id is its slot and the slot's generation, so an id kept by
//! someone else (the backend socket's epoll registration, a resolver task)
//! never reaches the slot's next flow.
//!
//! Cost: every operation is O(1) hash-map work, but the short-header lookup
//! (one per distinct CID length in use) and [`Table::each`]. Memory per
//! flow: its slot, one address entry and up to two CID entries.

use std::collections::HashMap;
use std::net::SocketAddr;

use wire::quic::{ConnectionId, MAX_CID_LEN};

/// A flow's slot and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowId {
    slot: u32,
    generation: u32,
}

impl FlowId {
    /// The id as one number (an epoll registration's data).
    pub fn pack(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.slot)
    }

    pub fn unpack(value: u64) -> FlowId {
        FlowId {
            slot: value as u32,
            generation: (value >> 32) as u32,
        }
    }
}

/// Which of a flow's two connection IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client = 0,
    Server = 1,
}

struct Keys {
    addr: SocketAddr,
    cids: [Option<ConnectionId>; 2],
}

struct Slot<F> {
    generation: u32,
    flow: Option<(Keys, F)>,
}

/// See the module documentation.
pub struct Table<F> {
    slots: Vec<Slot<F>>,
    free: Vec<u32>,
    by_addr: HashMap<SocketAddr, u32>,
    by_cid: HashMap<ConnectionId, u32>,
    /// How many flows have a server CID of each length.
    server_lens: [u32; MAX_CID_LEN + 1],
    len: usize,
}

impl<F> Default for Table<F> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            by_addr: HashMap::new(),
            by_cid: HashMap::new(),
            server_lens: [0; MAX_CID_LEN + 1],
            len: 0,
        }
    }
}

impl<F> Table<F> {
    /// Files a new flow under `addr` and the client's `dcid` (if any). An
    /// address or CID another flow already has stays that flow's (the new
    /// flow is then found by the other key only).
    pub fn insert(&mut self, addr: SocketAddr, dcid: Option<ConnectionId>, flow: F) -> FlowId {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    flow: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let entry = &mut self.slots[slot as usize];
        entry.generation = entry.generation.wrapping_add(1);
        let id = FlowId {
            slot,
            generation: entry.generation,
        };
        self.by_addr.entry(addr).or_insert(slot);
        let client = dcid.and_then(|dcid| match self.by_cid.entry(dcid) {
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(slot);
                Some(dcid)
            }
            std::collections::hash_map::Entry::Occupied(_) => None,
        });
        entry.flow = Some((
            Keys {
                addr,
                cids: [client, None],
            },
            flow,
        ));
        self.len += 1;
        id
    }

    fn slot(&self, id: FlowId) -> Option<&(Keys, F)> {
        let entry = self.slots.get(id.slot as usize)?;
        (entry.generation == id.generation)
            .then_some(entry.flow.as_ref())
            .flatten()
    }

    fn slot_mut(&mut self, id: FlowId) -> Option<&mut (Keys, F)> {
        let entry = self.slots.get_mut(id.slot as usize)?;
        if entry.generation != id.generation {
            return None;
        }
        entry.flow.as_mut()
    }

    fn id_of(&self, slot: u32) -> Option<FlowId> {
        let entry = self.slots.get(slot as usize)?;
        entry.flow.as_ref().map(|_| FlowId {
            slot,
            generation: entry.generation,
        })
    }

    pub fn get(&self, id: FlowId) -> Option<&F> {
        self.slot(id).map(|(_, flow)| flow)
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut F> {
        self.slot_mut(id).map(|(_, flow)| flow)
    }

    /// The flow's client CID and server CID, as filed.
    pub fn cids(&self, id: FlowId) -> [Option<ConnectionId>; 2] {
        self.slot(id).map_or([None, None], |(keys, _)| keys.cids)
    }

    /// Flows in the table.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The address the flow's replies go to.
    pub fn addr(&self, id: FlowId) -> Option<SocketAddr> {
        self.slot(id).map(|(keys, _)| keys.addr)
    }

    /// The flow of a client address.
    pub fn by_addr(&self, addr: &SocketAddr) -> Option<FlowId> {
        self.id_of(*self.by_addr.get(addr)?)
    }

    /// The flow a datagram's DCID names, if any: a long header's DCID, or
    /// a short header's first bytes for each server CID length in use.
    pub fn by_datagram(&self, datagram: &[u8]) -> Option<FlowId> {
        let first = *datagram.first()?;
        if first & 0x80 != 0 {
            // Long header: flags, version (4), DCID length, DCID.
            let len = usize::from(*datagram.get(5)?);
            let dcid = ConnectionId::new(datagram.get(6..6 + len)?)?;
            return self.id_of(*self.by_cid.get(&dcid)?);
        }
        for (len, &count) in self.server_lens.iter().enumerate().skip(1) {
            if count == 0 {
                continue;
            }
            let Some(bytes) = datagram.get(1..1 + len) else {
                break;
            };
            if let Some(&slot) = ConnectionId::new(bytes).and_then(|cid| self.by_cid.get(&cid)) {
                return self.id_of(slot);
            }
        }
        None
    }

    /// Files the flow under the server's CID `cid` (in place of the one it
    /// had). Not if another flow has it; an empty CID names nothing.
    pub fn set_server_cid(&mut self, id: FlowId, cid: ConnectionId) {
        if cid.is_empty() {
            return;
        }
        let Some((keys, _)) = self.slot(id) else {
            return;
        };
        if keys.cids[Side::Server as usize] == Some(cid) {
            return;
        }
        if self.by_cid.contains_key(&cid) {
            return;
        }
        self.forget_cid(id, Side::Server);
        self.by_cid.insert(cid, id.slot);
        self.server_lens[cid.len()] += 1;
        if let Some((keys, _)) = self.slot_mut(id) {
            keys.cids[Side::Server as usize] = Some(cid);
        }
    }

    fn forget_cid(&mut self, id: FlowId, side: Side) {
        let Some((keys, _)) = self.slot_mut(id) else {
            return;
        };
        let Some(cid) = keys.cids[side as usize].take() else {
            return;
        };
        if self.by_cid.get(&cid) == Some(&id.slot) {
            self.by_cid.remove(&cid);
        }
        if side == Side::Server {
            self.server_lens[cid.len()] -= 1;
        }
    }

    /// The client now sends from `addr` (NAT rebinding): replies go there.
    /// Not if another flow has that address.
    pub fn move_addr(&mut self, id: FlowId, addr: SocketAddr) -> bool {
        if self.by_addr.contains_key(&addr) {
            return false;
        }
        let Some((keys, _)) = self.slot_mut(id) else {
            return false;
        };
        let old = std::mem::replace(&mut keys.addr, addr);
        if self.by_addr.get(&old) == Some(&id.slot) {
            self.by_addr.remove(&old);
        }
        self.by_addr.insert(addr, id.slot);
        true
    }

    /// Takes the flow out, with the address its replies went to.
    pub fn remove(&mut self, id: FlowId) -> Option<(SocketAddr, F)> {
        self.slot(id)?;
        self.forget_cid(id, Side::Client);
        self.forget_cid(id, Side::Server);
        let (keys, flow) = self.slots[id.slot as usize].flow.take()?;
        if self.by_addr.get(&keys.addr) == Some(&id.slot) {
            self.by_addr.remove(&keys.addr);
        }
        self.free.push(id.slot);
        self.len -= 1;
        Some((keys.addr, flow))
    }

    /// Calls `visit` with each flow (for the timeout sweep).
    pub fn each(&self, mut visit: impl FnMut(FlowId, &F)) {
        for (slot, entry) in self.slots.iter().enumerate() {
            if let Some((_, flow)) = &entry.flow {
                visit(
                    FlowId {
                        slot: slot as u32,
                        generation: entry.generation,
                    },
                    flow,
                );
            }
        }
    }

    /// Every flow's id.
    pub fn ids(&self) -> Vec<FlowId> {
        let mut ids = Vec::with_capacity(self.len);
        self.each(|id, _| ids.push(id));
        ids
    }

    /// Entries in the key maps (for tests: nothing is left behind).
    #[cfg(test)]
    fn keys(&self) -> (usize, usize) {
        (self.by_addr.len(), self.by_cid.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(bytes: &[u8]) -> ConnectionId {
        ConnectionId::new(bytes).unwrap()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn long(dcid: &[u8]) -> Vec<u8> {
        let mut datagram = vec![0xc0, 0, 0, 0, 1, dcid.len() as u8];
        datagram.extend_from_slice(dcid);
        datagram.extend_from_slice(&[0; 30]);
        datagram
    }

    fn short(dcid: &[u8]) -> Vec<u8> {
        let mut datagram = vec![0x40];
        datagram.extend_from_slice(dcid);
        datagram.extend_from_slice(&[7; 30]);
        datagram
    }

    #[test]
    fn a_flow_is_found_by_address_client_dcid_and_server_cid() {
        let mut table = Table::default();
        let id = table.insert(addr(1), Some(cid(&[1; 8])), "a");
        assert_eq!(table.by_addr(&addr(1)), Some(id));
        assert_eq!(table.by_datagram(&long(&[1; 8])), Some(id));
        assert_eq!(table.by_datagram(&short(&[2; 5])), None);
        table.set_server_cid(id, cid(&[2; 5]));
        assert_eq!(table.by_datagram(&short(&[2; 5])), Some(id));
        assert_eq!(table.by_datagram(&long(&[2; 5])), Some(id));
        // A Retry's new SCID replaces the old one.
        table.set_server_cid(id, cid(&[3; 12]));
        assert_eq!(table.by_datagram(&short(&[2; 5])), None);
        assert_eq!(table.by_datagram(&short(&[3; 12])), Some(id));
        assert_eq!(table.get(id), Some(&"a"));
    }

    #[test]
    fn removal_leaves_no_key_and_a_stale_id_reaches_nothing() {
        let mut table = Table::default();
        let id = table.insert(addr(1), Some(cid(&[1; 8])), 1);
        table.set_server_cid(id, cid(&[2; 8]));
        assert!(table.move_addr(id, addr(2)));
        assert_eq!(table.remove(id), Some((addr(2), 1)));
        assert_eq!(table.keys(), (0, 0));
        assert_eq!(table.len(), 0);
        assert_eq!(table.by_datagram(&short(&[2; 8])), None);
        // The slot's next flow is not reached by the old id.
        let next = table.insert(addr(3), Some(cid(&[4; 8])), 2);
        assert_ne!(next, id);
        assert_eq!(table.get(id), None);
        assert_eq!(table.remove(id), None);
        assert_eq!(table.get(next), Some(&2));
        assert_eq!(FlowId::unpack(next.pack()), next);
    }

    #[test]
    fn rebinding_moves_the_address_and_keys_of_other_flows_stay_theirs() {
        let mut table = Table::default();
        let a = table.insert(addr(1), Some(cid(&[1; 8])), 'a');
        let b = table.insert(addr(2), Some(cid(&[1; 8])), 'b');
        // b's DCID was a's: b is found by address only.
        assert_eq!(table.by_datagram(&long(&[1; 8])), Some(a));
        table.set_server_cid(a, cid(&[9; 8]));
        table.set_server_cid(b, cid(&[9; 8]));
        assert_eq!(table.by_datagram(&short(&[9; 8])), Some(a));
        assert!(!table.move_addr(a, addr(2)), "b's address is b's");
        assert!(table.move_addr(a, addr(5)));
        assert_eq!(table.by_addr(&addr(5)), Some(a));
        assert_eq!(table.by_addr(&addr(1)), None);
        table.remove(b);
        assert_eq!(table.by_datagram(&long(&[1; 8])), Some(a));
        table.remove(a);
        assert_eq!(table.keys(), (0, 0));
    }

    #[test]
    fn hostile_datagrams_find_nothing() {
        let mut table = Table::default();
        let id = table.insert(addr(1), Some(cid(&[1; 8])), ());
        table.set_server_cid(id, cid(&[2; 20]));
        for datagram in [
            &[][..],
            &[0xc0],
            &[0xc0, 0, 0, 0, 1, 21],
            &[0xc0, 0, 0, 0, 1, 8, 1, 1],
            &[0x40, 2, 2],
            &[0xc0, 0, 0, 0, 1, 255, 1],
        ] {
            assert_eq!(table.by_datagram(datagram), None, "{datagram:?}");
        }
        // An empty server CID names nothing.
        table.set_server_cid(id, ConnectionId::default());
        assert_eq!(table.by_datagram(&short(&[2; 20])), Some(id));
    }
}
