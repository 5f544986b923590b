//! Peer names: what a name may hold, when two spellings are one name
//! ([`fold_name`]), and when two names only look alike ([`name_skeleton`]).
//! The registry, the peer and the names file all check names here, so a
//! name one of them accepts is one every other accepts too.

use std::fmt;

use unicode_script::Script;
use unicode_security::mixed_script::AugmentedScriptSet;

use crate::protocol::ErrorCode;

/// Longest peer name, in Unicode scalar values after trimming (joiners and
/// variation selectors count).
pub const MAX_NAME_CHARS: usize = 32;

/// ASCII punctuation a name may not hold: `/` starts a command, `,` and `:`
/// separate names and addresses in lists and commands, `<` and `>` frame a
/// sender in the text view, and quotes and the backslash read as escapes.
/// The other ASCII punctuation (`- _ . # + = ! ? @ ~ ^ * & $ % ( ) [ ] { } |`)
/// is allowed, `-` not as the first character (it would read as a flag).
const FORBIDDEN_ASCII: &str = "/,:;<>\"'`\\";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameError {
    /// It breaks the rules on its own (length, characters).
    Invalid(String),
    /// It could pass for another name: scripts mixed the way spoofed names
    /// mix them. (A clash with another peer's name is found by the
    /// registry, which knows the names in use.)
    Confusable(String),
}

impl NameError {
    /// The wire code the registry answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            NameError::Invalid(_) => ErrorCode::BadName,
            NameError::Confusable(_) => ErrorCode::NameConfusable,
        }
    }
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Invalid(why) | NameError::Confusable(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for NameError {}

/// Normalises a requested name: trims surrounding whitespace and checks the
/// rules (1–32 scalar values; no whitespace, control or invisible
/// characters; none of [`FORBIDDEN_ASCII`], nor anything that looks like
/// one; no leading `-`; scripts mixed at most as TR39's "moderately
/// restrictive" level allows).
pub fn normalize_name(raw: &str) -> Result<String, NameError> {
    let invalid = |why: String| Err(NameError::Invalid(why));
    let name = raw.trim();
    let chars = name.chars().count();
    if chars == 0 {
        return invalid("the name is empty".into());
    }
    if chars > MAX_NAME_CHARS {
        return invalid(format!(
            "the name has {chars} characters; at most {MAX_NAME_CHARS} are allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return invalid(format!(
            "the name contains {c:?}; whitespace and control characters are not allowed"
        ));
    }
    if let Some(c) = name.chars().find(|c| is_invisible(*c)) {
        return invalid(format!(
            "the name contains {c:?}, an invisible character (a name could hide behind it)"
        ));
    }
    if name.chars().all(is_joiner_or_selector) {
        return invalid("the name has nothing to see: only joiners or variation selectors".into());
    }
    if name.starts_with('-') {
        return invalid("the name starts with '-', which reads as an option".into());
    }
    let forbidden = |c: char| read_as(c).is_some_and(|a| FORBIDDEN_ASCII.contains(a));
    if let Some(c) = name.chars().find(|c| forbidden(*c)) {
        return invalid(format!(
            "the name contains {c:?}, or a character that looks like it; names may not hold any of {FORBIDDEN_ASCII}"
        ));
    }
    if name.chars().next().and_then(read_as) == Some('-') {
        return invalid(
            "the name starts with '-' (or a look-alike), which reads as an option".into(),
        );
    }
    if !scripts_mixed_safely(name) {
        return Err(NameError::Confusable(format!(
            "the name {name:?} mixes scripts whose letters look alike (such as Latin with Cyrillic or Greek), so it could pass for another name; write it in one script"
        )));
    }
    Ok(name.to_string())
}

/// The ASCII character `c` is, or reads as (its TR39 skeleton is that one
/// character): the fullwidth solidus and the ratio sign break nothing, but
/// read as `/` and `:`.
fn read_as(c: char) -> Option<char> {
    if c.is_ascii() {
        return Some(c);
    }
    let mut utf8 = [0; 4];
    let mut look = unicode_security::skeleton(c.encode_utf8(&mut utf8));
    match (look.next(), look.next()) {
        (Some(one), None) if one.is_ascii() => Some(one),
        _ => None,
    }
}

/// TR39's "moderately restrictive" rule for mixing scripts: a name is in
/// one script, or Latin with Han and Japanese or Korean, or Latin with one
/// other recommended script that does not look like it (not Cyrillic, not
/// Greek). Digits, punctuation, emoji and combining marks (Common and
/// Inherited) go with any script. Unlike TR39's identifier profile, rare and
/// historic characters are fine on their own: names may be in any script.
fn scripts_mixed_safely(name: &str) -> bool {
    let mut all = AugmentedScriptSet::default();
    let mut beside_latin = AugmentedScriptSet::default();
    for c in name.chars() {
        let set = AugmentedScriptSet::for_char(c);
        all.intersect_with(set);
        if !set.base.contains_script(Script::Latin) {
            beside_latin.intersect_with(set);
        }
    }
    if !all.is_empty() {
        return true;
    }
    if beside_latin.kore || beside_latin.hanb || beside_latin.jpan {
        return true;
    }
    let mut others = beside_latin.base.iter();
    match (others.next(), others.next()) {
        (Some(script), None) => {
            script.is_recommended() && script != Script::Cyrillic && script != Script::Greek
        }
        _ => false,
    }
}

/// Characters that show nothing: Unicode's default-ignorable code points
/// (direction overrides, zero-width spaces, fillers, tags and the like),
/// which could make one name pass for another, and the interlinear
/// annotation marks. The joiners and variation selectors that scripts and
/// emoji need stay allowed ([`is_joiner_or_selector`]); [`fold_name`]
/// ignores them instead, so they cannot tell names apart.
pub(crate) fn is_invisible(c: char) -> bool {
    !is_joiner_or_selector(c)
        && matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}'
            | '\u{17B5}' | '\u{180E}' | '\u{200B}' | '\u{200E}' | '\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FEFF}'
            | '\u{FFA0}' | '\u{FFF0}'..='\u{FFFB}' | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

/// Allowed in names, but not what tells one name from another: the
/// joiners U+200C and U+200D, and the variation selectors (emoji, CJK
/// ideograph variants, Mongolian free variation selectors).
fn is_joiner_or_selector(c: char) -> bool {
    matches!(c,
        '\u{200C}' | '\u{200D}' | '\u{FE00}'..='\u{FE0F}' | '\u{180B}'..='\u{180D}'
        | '\u{180F}' | '\u{E0100}'..='\u{E01EF}')
}

/// The form two names are compared in: each character lower-cased on its
/// own by Unicode's rules (so `Alice` and `alice` are one name), without
/// the joiners and variation selectors that do not change how a name reads.
pub fn fold_name(name: &str) -> String {
    name.chars()
        .filter(|c| !is_joiner_or_selector(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// What a name looks like: the TR39 skeleton of its folded form. Two names
/// with one skeleton and different folded forms (`alice` and `a1ice`,
/// Latin `ace` and Cyrillic `асе`) can pass for each other.
pub fn name_skeleton(name: &str) -> String {
    unicode_security::skeleton(&fold_name(name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(name: &str) -> String {
        match normalize_name(name) {
            Err(NameError::Invalid(why)) => why,
            other => panic!("{name:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn names_follow_the_rules() {
        assert_eq!(normalize_name("  alice \n").unwrap(), "alice");
        assert_eq!(normalize_name("张伟").unwrap(), "张伟");
        invalid("   ");
        invalid("a b");
        invalid("a\u{7}b");
        assert!(normalize_name(&"x".repeat(32)).is_ok());
        invalid(&"x".repeat(33));
        assert!(
            normalize_name(&"é".repeat(32)).is_ok(),
            "counts characters, not bytes"
        );
        assert_eq!(fold_name("ALICE"), fold_name("alice"));
    }

    #[test]
    fn punctuation_that_breaks_commands_or_display_is_refused() {
        for bad in [
            "/slash",
            "a/b",
            "a,b",
            "name:colon",
            "a;b",
            "<alice>",
            "a\"b",
            "it's",
            "a`b",
            "a\\b",
        ] {
            let why = invalid(bad);
            assert!(why.contains("may not hold"), "{bad:?}: {why}");
        }
        assert!(invalid("-dash").contains("'-'"));
        assert!(invalid("\u{2010}dash").contains("'-'"));
        for lookalike in ["a\u{FF0F}b", "a\u{2236}b", "a\u{201A}b"] {
            invalid(lookalike);
        }
        for good in [
            "a-b", "a_b", "a.b", "#general", "c++", "x=y", "hi!", "who?", "me@home", "~x", "a^b",
            "a*b", "a&b", "$5", "50%", "(x)", "[x]", "{x}", "a|b", "dash-",
        ] {
            assert_eq!(normalize_name(good).as_deref(), Ok(good), "{good:?}");
        }
    }

    #[test]
    fn scripts_that_look_alike_do_not_mix() {
        for spoof in [
            "\u{430}lice",
            "p\u{430}ypal",
            "\u{3bf}scar",
            "al\u{456}ce",
            "\u{430}\u{3b1}", // Cyrillic with Greek
            "a\u{10330}",     // Latin with a historic script
            "\u{5d0}\u{627}", // Hebrew with Arabic
        ] {
            match normalize_name(spoof) {
                Err(e @ NameError::Confusable(_)) => {
                    assert_eq!(e.code(), ErrorCode::NameConfusable)
                }
                other => panic!("{spoof:?}: {other:?}"),
            }
        }
        for fine in [
            "алиса",                     // Cyrillic alone
            "σοφία",                     // Greek alone
            "alice東京",                 // Latin with Han and Japanese
            "tokyo東京たろう",           // Latin, Han, Hiragana
            "김철수kim",                 // Latin with Hangul
            "ravi\u{930}\u{935}\u{93F}", // Latin with Devanagari
            "00000\u{20000}\u{20001}",   // a rare ideograph, digits
            "\u{10330}\u{10331}",        // Gothic, alone
            "bob2",
            "\u{1F468}\u{200D}\u{1F469}",
            "alice\u{2764}\u{FE0F}",
            "zoë",
        ] {
            assert_eq!(normalize_name(fine).as_deref(), Ok(fine), "{fine:?}");
        }
    }

    #[test]
    fn skeletons_tell_which_names_pass_for_each_other() {
        assert_eq!(name_skeleton("alice"), name_skeleton("a1ice"));
        assert_eq!(name_skeleton("ace"), name_skeleton("\u{430}\u{441}\u{435}"));
        assert_eq!(name_skeleton("Alice"), name_skeleton("alice"));
        assert_eq!(name_skeleton("rn"), name_skeleton("m"));
        assert_ne!(name_skeleton("alice"), name_skeleton("alicia"));
    }

    #[test]
    fn names_cannot_hide_behind_invisible_characters() {
        for hidden in [
            "ali\u{202E}ce",
            "\u{200B}alice",
            "al\u{AD}ice",
            "a\u{2066}b\u{2069}",
            "\u{FEFF}x",
            "alice\u{3164}",
            "\u{115F}alice",
            "alice\u{034F}",
            "alice\u{E0020}",
        ] {
            let why = invalid(hidden);
            assert!(why.contains("invisible"), "{hidden:?}: {why}");
        }
        // Joiners and selectors that scripts and emoji need stay allowed,
        // but do not make another name.
        assert!(normalize_name("\u{1F468}\u{200D}\u{1F469}").is_ok());
        assert!(normalize_name("\u{645}\u{200C}\u{6CC}").is_ok());
        assert!(normalize_name("\u{2764}\u{FE0F}").is_ok());
        for lookalike in [
            "alice\u{200D}",
            "\u{200C}alice",
            "alice\u{FE0F}",
            "AL\u{200D}ICE",
        ] {
            assert_eq!(fold_name(lookalike), fold_name("alice"), "{lookalike:?}");
        }
        assert!(
            normalize_name("\u{8FBB}\u{E0100}").is_ok(),
            "an ideograph variant"
        );
        for nothing in ["\u{200D}", "\u{FE0F}", "\u{200C}\u{200D}"] {
            let why = invalid(nothing);
            assert!(why.contains("nothing to see"), "{nothing:?}: {why}");
        }
    }

    #[test]
    fn folding_lower_cases_each_character_on_its_own() {
        assert_eq!(fold_name("ΟΔΟΣ"), "οδοσ", "no final sigma");
        assert_eq!(fold_name("ẞ"), fold_name("ß"));
        assert_ne!(
            fold_name("ﬀ"),
            fold_name("FF"),
            "lower-casing, not case folding"
        );
    }
}
