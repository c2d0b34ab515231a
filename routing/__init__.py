"""Session-affinity routing, the conversation store, ownership and fencing."""
