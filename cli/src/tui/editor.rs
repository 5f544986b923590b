//! The input line: emacs keys, a history of what was typed, and Tab
//! completion. It works on grapheme clusters, so that the cursor never
//! lands inside an emoji sequence or a combined character, and measures
//! them as ratatui draws them.

use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

/// Typed lines kept for Up and Down (and in the store, across runs).
pub const HISTORY_KEPT: usize = 500;

#[derive(Debug, Default)]
pub struct Editor {
    text: String,
    /// A byte offset into `text`, always on a grapheme boundary.
    cursor: usize,
    /// Oldest first.
    history: Vec<String>,
    /// Where Up and Down are in `history`, with the line being typed
    /// before the walk started.
    walk: Option<(usize, String)>,
    /// The text Ctrl-U, Ctrl-K and Ctrl-W took, for Ctrl-Y.
    killed: String,
    completion: Option<Completion>,
}

/// A Tab cycle: the word as typed, the candidates, which one is shown, and
/// where the replaced text starts.
#[derive(Debug)]
struct Completion {
    start: usize,
    candidates: Vec<String>,
    shown: usize,
}

impl Editor {
    pub fn with_history(history: Vec<String>) -> Editor {
        Editor {
            history,
            ..Editor::default()
        }
    }

    #[cfg(test)]
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Ends the line: returns it and remembers it for Up.
    pub fn take(&mut self) -> String {
        self.reset_transient();
        self.cursor = 0;
        let line = std::mem::take(&mut self.text);
        self.remember(&line);
        line
    }

    /// A line sent without being typed here (a pasted line).
    pub fn remember(&mut self, line: &str) {
        if line.trim().is_empty() || self.history.last().is_some_and(|last| last == line) {
            return;
        }
        self.history.push(line.to_string());
        if self.history.len() > HISTORY_KEPT {
            self.history.remove(0);
        }
    }

    pub fn clear(&mut self) {
        self.reset_transient();
        self.text.clear();
        self.cursor = 0;
    }

    pub fn insert(&mut self, s: &str) {
        self.reset_transient();
        self.text.insert_str(self.cursor, s);
        self.cursor += s.len();
    }

    pub fn left(&mut self) {
        self.cursor = self.prev_boundary(self.cursor);
    }

    pub fn right(&mut self) {
        self.cursor = self.next_boundary(self.cursor);
    }

    pub fn home(&mut self) {
        self.cursor = 0;
    }

    pub fn end(&mut self) {
        self.cursor = self.text.len();
    }

    pub fn backspace(&mut self) {
        self.reset_transient();
        let start = self.prev_boundary(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    pub fn delete(&mut self) {
        self.reset_transient();
        let end = self.next_boundary(self.cursor);
        self.text.replace_range(self.cursor..end, "");
    }

    pub fn word_left(&mut self) {
        self.cursor = self.word_start(self.cursor);
    }

    pub fn word_right(&mut self) {
        self.cursor = self.word_end(self.cursor);
    }

    /// Ctrl-U.
    pub fn kill_to_start(&mut self) {
        self.kill(0, self.cursor);
    }

    /// Ctrl-K.
    pub fn kill_to_end(&mut self) {
        self.kill(self.cursor, self.text.len());
    }

    /// Ctrl-W.
    pub fn kill_word_back(&mut self) {
        self.kill(self.word_start(self.cursor), self.cursor);
    }

    /// Alt-D.
    pub fn kill_word_forward(&mut self) {
        self.kill(self.cursor, self.word_end(self.cursor));
    }

    /// Ctrl-Y.
    pub fn yank(&mut self) {
        let killed = self.killed.clone();
        self.insert(&killed);
    }

    /// Up: the previous typed line; the line being typed is kept for Down.
    pub fn older(&mut self) {
        self.completion = None;
        let at = match &self.walk {
            Some((at, _)) => *at,
            None => self.history.len(),
        };
        if at == 0 {
            return;
        }
        if self.walk.is_none() {
            self.walk = Some((at, self.text.clone()));
        }
        self.show_history(at - 1);
    }

    /// Down: the next typed line, then the line that was being typed.
    pub fn newer(&mut self) {
        self.completion = None;
        let Some((at, draft)) = &self.walk else {
            return;
        };
        if at + 1 < self.history.len() {
            self.show_history(at + 1);
        } else {
            self.text = draft.clone();
            self.cursor = self.text.len();
            self.walk = None;
        }
    }

    /// Tab: completes the word before the cursor from `candidates` (command
    /// names for a first word starting with `/`, else `names`), cycling on
    /// each press. A name completed as a line's first word gets `: `.
    pub fn complete(&mut self, commands: &[&str], names: &[String]) {
        if let Some(completion) = &mut self.completion {
            completion.shown = (completion.shown + 1) % completion.candidates.len();
            let (start, word) = (
                completion.start,
                completion.candidates[completion.shown].clone(),
            );
            self.text.replace_range(start..self.cursor, &word);
            self.cursor = start + word.len();
            return;
        }
        let start = self.text[..self.cursor]
            .rfind(char::is_whitespace)
            .map_or(0, |i| {
                i + self.text[i..].chars().next().map_or(1, char::len_utf8)
            });
        let word = &self.text[start..self.cursor];
        let first = self.text[..start].trim().is_empty();
        let lower = word.to_lowercase();
        let candidates: Vec<String> = if first && word.starts_with('/') {
            commands
                .iter()
                .filter(|c| c.starts_with(&lower))
                .map(|c| format!("{c} "))
                .collect()
        } else {
            let suffix = if first { ": " } else { " " };
            let mut matching: Vec<&String> = names
                .iter()
                .filter(|n| n.to_lowercase().starts_with(&lower))
                .collect();
            matching.sort_by_key(|n| n.to_lowercase());
            matching.dedup();
            matching.iter().map(|n| format!("{n}{suffix}")).collect()
        };
        let Some(first_candidate) = candidates.first().cloned() else {
            return;
        };
        self.text
            .replace_range(start..self.cursor, &first_candidate);
        self.cursor = start + first_candidate.len();
        // One candidate needs no cycle: the next Tab completes anew.
        if candidates.len() > 1 {
            self.completion = Some(Completion {
                start,
                candidates,
                shown: 0,
            });
        }
    }

    /// What of the line fits in `width` columns around the cursor: the
    /// text from a grapheme boundary, and the cursor's column in it.
    pub fn visible(&self, width: usize) -> (&str, usize) {
        let width = width.max(2);
        let before = self.text[..self.cursor].width();
        if before < width {
            return (&self.text, before);
        }
        // Scroll so that the cursor sits in the last column but one.
        let mut start = 0;
        let mut skipped = 0;
        for (i, g) in self.text.grapheme_indices(true) {
            if before - skipped < width {
                break;
            }
            skipped += g.width();
            start = i + g.len();
        }
        (&self.text[start..], before - skipped)
    }

    fn show_history(&mut self, at: usize) {
        if let Some((walk_at, _)) = &mut self.walk {
            *walk_at = at;
        }
        self.text = self.history[at].clone();
        self.cursor = self.text.len();
    }

    fn kill(&mut self, start: usize, end: usize) {
        if start >= end {
            return;
        }
        self.reset_transient();
        self.killed = self.text[start..end].to_string();
        self.text.replace_range(start..end, "");
        self.cursor = start;
    }

    /// Editing ends a history walk (the edited line is a new one) and a
    /// completion cycle.
    fn reset_transient(&mut self) {
        self.walk = None;
        self.completion = None;
    }

    fn prev_boundary(&self, at: usize) -> usize {
        self.text[..at]
            .grapheme_indices(true)
            .next_back()
            .map_or(0, |(i, _)| i)
    }

    fn next_boundary(&self, at: usize) -> usize {
        self.text[at..]
            .graphemes(true)
            .next()
            .map_or(at, |g| at + g.len())
    }

    /// The start of the word before `at` (spaces before it skipped).
    fn word_start(&self, at: usize) -> usize {
        let mut start = at;
        let mut in_word = false;
        for (i, g) in self.text[..at].grapheme_indices(true).rev() {
            let space = g.chars().all(char::is_whitespace);
            if space && in_word {
                break;
            }
            in_word |= !space;
            start = i;
        }
        start
    }

    /// The end of the word after `at` (spaces before it skipped).
    fn word_end(&self, at: usize) -> usize {
        let mut end = at;
        let mut in_word = false;
        for (i, g) in self.text[at..].grapheme_indices(true) {
            let space = g.chars().all(char::is_whitespace);
            if space && in_word {
                break;
            }
            in_word |= !space;
            end = at + i + g.len();
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> Editor {
        let mut e = Editor::default();
        e.insert(text);
        e
    }

    #[test]
    fn the_cursor_moves_by_whole_graphemes() {
        // A family emoji (ZWJ sequence), a combined e and a CJK character.
        let mut e = typed("a👨‍👩‍👧e\u{301}中");
        e.left();
        assert_eq!(e.visible(80).1, 4, "after a, the emoji and é");
        e.left();
        e.backspace();
        assert_eq!(e.text(), "ae\u{301}中", "the emoji goes whole");
        e.end();
        e.backspace();
        e.backspace();
        assert_eq!(e.text(), "a");
    }

    #[test]
    fn emacs_keys_kill_and_yank() {
        let mut e = typed("hello big world");
        e.kill_word_back();
        assert_eq!(e.text(), "hello big ");
        e.yank();
        assert_eq!(e.text(), "hello big world");
        e.home();
        e.word_right();
        e.kill_to_end();
        assert_eq!(e.text(), "hello");
        e.word_left();
        e.kill_word_forward();
        assert_eq!(e.text(), "");
        let mut e = typed("one two");
        e.word_left();
        e.kill_to_start();
        assert_eq!(e.text(), "two");
    }

    #[test]
    fn up_and_down_walk_the_history_and_keep_the_draft() {
        let mut e = Editor::with_history(vec!["first".into(), "second".into()]);
        e.insert("dra");
        e.older();
        assert_eq!(e.text(), "second");
        e.older();
        e.older();
        assert_eq!(e.text(), "first");
        e.newer();
        e.newer();
        assert_eq!(e.text(), "dra");
        e.insert("ft");
        assert_eq!(e.take(), "draft");
        e.older();
        assert_eq!(e.text(), "draft", "a sent line is remembered");
    }

    #[test]
    fn tab_completes_commands_and_names_and_cycles() {
        let names = vec!["bob".to_string(), "Bella".to_string(), "carol".to_string()];
        let mut e = typed("/wh");
        e.complete(&["/whois", "/msg"], &names);
        assert_eq!(e.text(), "/whois ");
        let mut e = typed("b");
        e.complete(&[], &names);
        assert_eq!(e.text(), "Bella: ", "a name first on the line");
        e.complete(&[], &names);
        assert_eq!(e.text(), "bob: ", "Tab again cycles");
        e.complete(&[], &names);
        assert_eq!(e.text(), "Bella: ");
        let mut e = typed("hi ca");
        e.complete(&[], &names);
        assert_eq!(e.text(), "hi carol ");
        let mut e = typed("zz");
        e.complete(&[], &names);
        assert_eq!(e.text(), "zz", "nothing matches: nothing changes");
    }

    #[test]
    fn a_long_line_scrolls_to_keep_the_cursor_in_view() {
        let e = typed(&"中".repeat(20));
        let (shown, column) = e.visible(10);
        assert!(column < 10, "{column}");
        assert!(shown.width() >= 8);
        assert_eq!(typed("short").visible(10), ("short", 5));
    }
}
