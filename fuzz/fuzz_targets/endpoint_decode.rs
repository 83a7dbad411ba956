//! `Endpoint::decode` and `Node::decode` on arbitrary bytes. Input: `KEY\nVALUE`, or just a
//! value (decoded at a fixed, valid endpoint key). Property: decoding never panics, and a record
//! that decodes encodes again and decodes to itself (what presence writes, confgen reads back).
#![no_main]

use flotilla_registry::{Endpoint, Keys, Node};
use libfuzzer_sys::fuzz_target;

const KEY: &str = "/flotilla/endpoints/node-a/web/node-a-0123456789ab-8080";

fuzz_target!(|data: &[u8]| {
    let keys = Keys::new("/flotilla").expect("prefix");
    let (key, value) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (
            String::from_utf8_lossy(&data[..i]).into_owned(),
            &data[i + 1..],
        ),
        None => (KEY.to_owned(), data),
    };
    let _ = keys.parse(&key);
    if let Ok(ep) = Endpoint::decode(&keys, &key, value) {
        let again = ep.encode(&keys).expect("a decoded endpoint encodes");
        let back = Endpoint::decode(&keys, &ep.key(&keys), &again).expect("and decodes again");
        assert_eq!(back, ep);
    }
    let node_key = keys.node("node-a");
    if let Ok(node) = Node::decode(&keys, &node_key, value) {
        let again = node.encode(&keys).expect("a decoded node encodes");
        assert_eq!(
            Node::decode(&keys, &node_key, &again).expect("decodes again"),
            node
        );
    }
});
