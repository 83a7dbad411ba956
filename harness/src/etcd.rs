//! Real etcd: single member, TLS + auth, 3-member cluster.
