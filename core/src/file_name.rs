//! The name a received file is saved under: the receiver's choice, made
//! from what its sender offered (PROTOCOL.md 5.4). Here, not in the peer,
//! so that the fuzzers check it.

use crate::names::is_invisible;

/// The longest file name saved, in bytes: room under the usual 255 for
/// ` (999)` and the partial file's decoration.
pub const MAX_NAME_BYTES: usize = 200;

/// The name a received file is saved under, from the one its sender
/// offered: never a path (separators become `_`), never hidden or `..`
/// (leading dots go), no control characters and none of the invisible
/// ones names may not hold either (a right-to-left override can make a
/// name that ends in `.exe` read as one that ends in `.jpg`), at most
/// [`MAX_NAME_BYTES`], and never empty.
pub fn safe_file_name(offered: &str) -> String {
    let cleaned: String = offered
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c.is_control() || is_invisible(c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let trimmed = cleaned
        .trim_start_matches(|c: char| c == '.' || c.is_whitespace())
        .trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    let mut name = String::new();
    for c in trimmed.chars() {
        if name.len() + c.len_utf8() > MAX_NAME_BYTES {
            break;
        }
        name.push(c);
    }
    let name = name.trim_end_matches(|c: char| c == '.' || c.is_whitespace());
    if name.is_empty() {
        "file".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offered_names_are_made_safe() {
        assert_eq!(safe_file_name("report.pdf"), "report.pdf");
        assert_eq!(safe_file_name("../../etc/passwd"), "_.._etc_passwd");
        assert_eq!(safe_file_name("/etc/passwd"), "_etc_passwd");
        assert_eq!(safe_file_name("..\\..\\boot.ini"), "_.._boot.ini");
        assert_eq!(safe_file_name(".bashrc"), "bashrc");
        assert_eq!(safe_file_name(".."), "file");
        assert_eq!(safe_file_name(""), "file");
        assert_eq!(safe_file_name("  . "), "file");
        assert_eq!(safe_file_name("a\nb\u{7}c"), "a_b_c");
        // Right-to-left override: "invoice\u{202E}fdp.exe" would show as
        // "invoiceexe.pdf".
        assert_eq!(safe_file_name("invoice\u{202E}fdp.exe"), "invoice_fdp.exe");
        assert_eq!(safe_file_name("zero\u{200B}width"), "zero_width");
        assert_eq!(safe_file_name("写真.jpg"), "写真.jpg");
        let long = "é".repeat(300);
        let safe = safe_file_name(&long);
        assert!(safe.len() <= MAX_NAME_BYTES && safe.chars().all(|c| c == 'é'));
        assert_eq!(safe_file_name("trailing. . "), "trailing");
    }
}
