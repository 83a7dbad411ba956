//! The systemd quoting round-trips: any text without control characters, put through
//! `exec_word`, comes back unchanged when split by systemd's rules (implemented independently in
//! `common::split_command`, from systemd.service(5)); and a whole command line of such words
//! splits back into exactly those words.

mod common;

use common::{expand_specifiers, split_command};
use fleet_units::quote::{exec_word, setting_value};
use proptest::prelude::*;

/// Text biased towards the characters systemd treats specially.
fn tricky_text() -> impl Strategy<Value = String> {
    let special = proptest::sample::select(vec![
        ' ', '"', '\'', '\\', '%', '$', ';', '{', '}', '#', '=', '-', 'i', 'n', 'a', 'é', '世',
        '@', ':',
    ]);
    let any_printable = any::<char>().prop_filter("no control characters", |c| !c.is_control());
    proptest::collection::vec(prop_oneof![3 => special, 1 => any_printable], 0..24)
        .prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn one_word_round_trips(s in tricky_text()) {
        let word = exec_word(&s).unwrap();
        prop_assert!(!word.contains('\n'));
        let line = expand_specifiers(&format!("/usr/bin/docker {word}"), Some("7"));
        prop_assert_eq!(split_command(&line), vec!["/usr/bin/docker".to_string(), s]);
    }

    #[test]
    fn command_lines_round_trip(words in proptest::collection::vec(tricky_text(), 0..8)) {
        let quoted: Vec<String> = words.iter().map(|w| exec_word(w).unwrap()).collect();
        let line = format!("/bin/true {}", quoted.join(" "));
        let mut want = vec!["/bin/true".to_string()];
        want.extend(words);
        prop_assert_eq!(split_command(&expand_specifiers(&line, None)), want);
    }

    #[test]
    fn settings_keep_their_text(s in tricky_text()) {
        let v = setting_value(&s).unwrap();
        prop_assert_eq!(expand_specifiers(&v, None), s);
    }

    #[test]
    fn control_characters_never_pass(prefix in tricky_text(), c in any::<char>().prop_filter("control", |c| c.is_control()), suffix in tricky_text()) {
        let s = format!("{prefix}{c}{suffix}");
        prop_assert!(exec_word(&s).is_err());
        prop_assert!(setting_value(&s).is_err());
    }
}
