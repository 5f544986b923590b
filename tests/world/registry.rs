//! The registry machine in the world, with clients that only register.

use std::time::Duration;

use peerchat_core::machine::LinkId;
use peerchat_registry::{Config, Registry};
use peerchat_testkit::world::{NodeId, World};

use crate::registrar::Registrar;

fn registry_config() -> Config {
    Config {
        heartbeat: Duration::from_millis(500),
        timeout: Duration::from_secs(2),
        ..Config::default()
    }
}

fn world_with_registry() -> (World, NodeId) {
    let mut world = World::new();
    let registry = world.add(Some(7000), |n| Registry::new(registry_config(), n.now));
    (world, registry)
}

fn registrar(world: &mut World, registry: NodeId, name: &str) -> NodeId {
    let addr = world.addr(registry);
    world.add(None, |_| Registrar::new(name, addr))
}

#[test]
fn clients_register_and_everyone_hears_of_everyone() {
    let (mut world, registry) = world_with_registry();
    let clients: Vec<NodeId> = ["alice", "bob", "carol"]
        .iter()
        .map(|name| registrar(&mut world, registry, name))
        .collect();
    world.run_for(Duration::from_secs(1));
    for &c in &clients {
        let client = world.machine::<Registrar>(c);
        assert!(client.is_welcomed());
        assert_eq!(client.directory().len(), 2, "{:?}", client.heard);
    }
    assert_eq!(world.machine::<Registry<LinkId>>(registry).peer_count(), 3);
}

#[test]
fn a_frozen_client_is_evicted_and_the_others_are_told_timeout() {
    let (mut world, registry) = world_with_registry();
    let alice = registrar(&mut world, registry, "alice");
    let bob = registrar(&mut world, registry, "bob");
    world.run_for(Duration::from_secs(1));
    world.freeze(bob);
    world.run_for(Duration::from_secs(3));
    assert_eq!(
        world.machine::<Registrar>(alice).left_reasons(),
        vec![("bob".to_string(), "timeout".to_string())]
    );
    assert_eq!(
        world.machine::<Registrar>(alice).directory(),
        Vec::<String>::new()
    );
    // Thawed, bob finds its link closed: it was evicted.
    world.thaw(bob);
    world.run_for(Duration::from_millis(100));
    assert!(world.machine::<Registrar>(bob).closed.is_some());
}

#[test]
fn a_crashed_registry_resets_every_client_and_a_restarted_one_takes_them_again() {
    let (mut world, registry) = world_with_registry();
    let alice = registrar(&mut world, registry, "alice");
    world.run_for(Duration::from_millis(500));
    world.crash(registry);
    world.run_for(Duration::from_millis(10));
    assert!(matches!(
        world.machine::<Registrar>(alice).closed,
        Some(peerchat_core::CloseReason::Io(_))
    ));
    world.restart(registry, |n| Registry::new(registry_config(), n.now));
    let addr = world.addr(registry);
    let again = world.add(None, |_| Registrar::new("alice", addr));
    assert!(world.run_until(Duration::from_secs(1), |w| w
        .machine::<Registrar>(again)
        .is_welcomed()));
}

#[test]
fn a_dial_to_nobody_fails() {
    let (mut world, registry) = world_with_registry();
    world.crash(registry);
    let alice = registrar(&mut world, registry, "alice");
    world.run_for(Duration::from_millis(10));
    assert!(matches!(
        world.machine::<Registrar>(alice).closed,
        Some(peerchat_core::CloseReason::ConnectFailed(_))
    ));
}
