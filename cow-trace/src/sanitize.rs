//! Text that other processes control (command names, mapped file paths),
//! made safe to print on a terminal, and bytes that need not be UTF-8 made
//! into text without losing any.
//!
//! cow-trace usually runs as root and prints names chosen by any local user:
//! `prctl(PR_SET_NAME)` and file names accept every byte but NUL (and `/`).
//! Printed raw, an escape sequence recolours or clears the operator's
//! screen and a newline forges a table row. Like `ps`, everything that is not
//! a printable character is replaced visibly, here by an escape that names
//! it (`\x1b`, `\n`, `\u{202e}`), and a backslash is doubled, so two
//! different names never print alike. JSON output does not use
//! [`for_terminal`]: its encoder escapes exactly. See SECURITY.md.

use std::{borrow::Cow, fmt::Write as _};

/// `text` with every control character, invisible formatting character and
/// backslash escaped; `Cow::Borrowed` when nothing needed it (the common
/// case: a table costs no allocation per row).
pub fn for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

/// Bytes from the kernel or /proc (a comm, a mapped path) as text: exactly
/// the text when they are UTF-8, else each byte of an invalid sequence
/// written as the four characters `\xNN`. Every byte value survives, so
/// JSON, which must be UTF-8, still says which bytes a name held (README:
/// "Names that are not UTF-8").
pub fn lossless(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(s) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    Cow::Owned(out)
}

/// Columns `printed` (already sanitised) takes in a table: one per
/// character. The escapes are ASCII; what else is left is printable text
/// (East Asian wide characters, which take two, are not told apart).
pub fn width(printed: &str) -> usize {
    printed.chars().count()
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_invisible_format(c)
}

/// Characters that print as nothing yet change what follows: bidirectional
/// overrides and isolates (which reorder a line so that it reads as
/// something else), zero-width characters, line and paragraph separators,
/// invisible tags.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{034f}' | '\u{061c}' | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{e0000}'..='\u{e007f}')
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\t' => out.push_str("\\t"),
        '\r' => out.push_str("\\r"),
        c if (c as u32) < 0x100 && needs_escape(c) => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_pass_unchanged_and_unallocated() {
        for name in [
            "redis-server",
            "python3.11",
            "kworker/0:1",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "café",
            "名前",
        ] {
            assert!(matches!(for_terminal(name), Cow::Borrowed(s) if s == name), "{name}");
            assert!(matches!(lossless(name.as_bytes()), Cow::Borrowed(s) if s == name), "{name}");
        }
        assert_eq!(for_terminal(""), "");
    }

    #[test]
    fn control_characters_become_visible_escapes() {
        assert_eq!(for_terminal("\x1b[31mEV\nIL\x07"), "\\x1b[31mEV\\nIL\\x07");
        assert_eq!(for_terminal("a\tb\rc\x7fd\u{9b}e"), "a\\tb\\rc\\x7fd\\x9be");
        assert_eq!(for_terminal("\0"), "\\x00");
        // A backslash is escaped too, so an escape in the output always
        // stands for a character that was replaced: `\x1b` typed literally
        // by the process prints as `\\x1b`.
        assert_eq!(for_terminal("a\\x1b"), "a\\\\x1b");
        assert_ne!(for_terminal("\x1b"), for_terminal("\\x1b"));
    }

    #[test]
    fn invisible_reordering_characters_are_escaped() {
        assert_eq!(for_terminal("abc\u{202e}fdp.exe"), "abc\\u{202e}fdp.exe");
        assert_eq!(for_terminal("x\u{200b}y\u{feff}"), "x\\u{200b}y\\u{feff}");
        assert_eq!(for_terminal("line\u{2028}sep"), "line\\u{2028}sep");
        assert_eq!(for_terminal("tag\u{e0041}"), "tag\\u{e0041}");
    }

    #[test]
    fn invalid_utf8_bytes_are_named_and_kept() {
        assert_eq!(lossless(b"ok"), "ok");
        assert_eq!(lossless(b"a\xffb\xc3"), "a\\xffb\\xc3");
        // Valid characters, controls included, stay exact: only the
        // terminal escapes them.
        assert_eq!(lossless(b"\xe2\x80\xae\x1b\xfe"), "\u{202e}\x1b\\xfe");
        assert_eq!(lossless("é\n".as_bytes()), "é\n");
        // On a terminal the same name shows no raw byte at all.
        assert_eq!(for_terminal(&lossless(b"\xe2\x80\xae\x1b\xfe")), "\\u{202e}\\x1b\\\\xfe");
    }

    #[test]
    fn output_never_holds_a_control_character() {
        // Every byte value, alone and inside text, then every character of
        // the first planes.
        for b in 0..=255u8 {
            let raw = [b'x', b, b'y'];
            let s = for_terminal(&lossless(&raw)).into_owned();
            assert!(!s.chars().any(|c| c.is_control() || is_invisible_format(c)), "byte {b:#x}: {s:?}");
            assert_eq!(width(&s), s.chars().count());
        }
        for c in (0..0x3_0000u32).filter_map(char::from_u32) {
            let s = for_terminal(c.encode_utf8(&mut [0; 4])).into_owned();
            assert!(!s.chars().any(|c| c.is_control() || is_invisible_format(c)), "{c:?}: {s:?}");
        }
    }
}
