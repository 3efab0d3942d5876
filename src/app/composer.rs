//! The message composer: a multi-line text buffer with a cursor, Emacs-style editing and
//! grapheme-aware movement (so emoji and combining marks move and delete as one character).

use unicode_segmentation::UnicodeSegmentation;

/// Text being typed. The cursor is a byte offset that always sits on a grapheme boundary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Composer {
    text: String,
    cursor: usize,
}

impl Composer {
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn cursor(&self) -> usize {
        self.cursor
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    pub fn line_count(&self) -> usize {
        self.text.split('\n').count()
    }

    /// Replaces the text and puts the cursor at its end.
    pub fn set(&mut self, text: &str) {
        self.text = text.to_string();
        self.cursor = self.text.len();
    }

    /// Takes the text out, leaving the composer empty.
    pub fn take(&mut self) -> String {
        self.cursor = 0;
        std::mem::take(&mut self.text)
    }

    pub fn insert(&mut self, text: &str) {
        // Terminals send "\r" for newlines in pastes; a chat line wants "\n".
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        self.text.insert_str(self.cursor, &text);
        self.cursor += text.len();
    }

    fn previous_boundary(&self, from: usize) -> usize {
        self.text[..from]
            .grapheme_indices(true)
            .next_back()
            .map(|(index, _)| index)
            .unwrap_or(0)
    }

    fn next_boundary(&self, from: usize) -> usize {
        self.text[from..]
            .graphemes(true)
            .next()
            .map(|grapheme| from + grapheme.len())
            .unwrap_or(from)
    }

    pub fn left(&mut self) {
        self.cursor = self.previous_boundary(self.cursor);
    }

    pub fn right(&mut self) {
        self.cursor = self.next_boundary(self.cursor);
    }

    fn line_start(&self) -> usize {
        self.text[..self.cursor]
            .rfind('\n')
            .map(|index| index + 1)
            .unwrap_or(0)
    }

    fn line_end(&self) -> usize {
        self.text[self.cursor..]
            .find('\n')
            .map(|index| self.cursor + index)
            .unwrap_or(self.text.len())
    }

    pub fn home(&mut self) {
        self.cursor = self.line_start();
    }

    pub fn end(&mut self) {
        self.cursor = self.line_end();
    }

    fn word_start_before(&self, from: usize) -> usize {
        let mut start = from;
        let mut seen_word = false;
        for (index, grapheme) in self.text[..from].grapheme_indices(true).rev() {
            let is_word = grapheme.chars().any(char::is_alphanumeric);
            if is_word {
                seen_word = true;
            } else if seen_word {
                break;
            }
            start = index;
        }
        start
    }

    fn word_end_after(&self, from: usize) -> usize {
        let mut end = from;
        let mut seen_word = false;
        for (index, grapheme) in self.text[from..].grapheme_indices(true) {
            let is_word = grapheme.chars().any(char::is_alphanumeric);
            if is_word {
                seen_word = true;
            } else if seen_word {
                break;
            }
            end = from + index + grapheme.len();
        }
        end
    }

    pub fn word_left(&mut self) {
        self.cursor = self.word_start_before(self.cursor);
    }

    pub fn word_right(&mut self) {
        self.cursor = self.word_end_after(self.cursor);
    }

    pub fn backspace(&mut self) {
        let start = self.previous_boundary(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    pub fn delete(&mut self) {
        let end = self.next_boundary(self.cursor);
        self.text.replace_range(self.cursor..end, "");
    }

    /// Ctrl+W: deletes the word before the cursor.
    pub fn delete_word_before(&mut self) {
        let start = self.word_start_before(self.cursor);
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// Alt+D: deletes the word after the cursor.
    pub fn delete_word_after(&mut self) {
        let end = self.word_end_after(self.cursor);
        self.text.replace_range(self.cursor..end, "");
    }

    /// Ctrl+K: deletes to the end of the line (or the newline itself at a line's end).
    pub fn kill_to_end(&mut self) {
        let end = self.line_end();
        let end = if end == self.cursor {
            self.next_boundary(end)
        } else {
            end
        };
        self.text.replace_range(self.cursor..end, "");
    }

    /// Ctrl+U: deletes to the start of the line.
    pub fn kill_to_start(&mut self) {
        let start = self.line_start();
        self.text.replace_range(start..self.cursor, "");
        self.cursor = start;
    }

    /// The word being typed at the cursor (for completion) and where it starts.
    pub fn current_word(&self) -> (usize, &str) {
        let start = self.text[..self.cursor]
            .rfind(char::is_whitespace)
            .map(|index| {
                index
                    + self.text[index..]
                        .chars()
                        .next()
                        .map(char::len_utf8)
                        .unwrap_or(1)
            })
            .unwrap_or(0);
        (start, &self.text[start..self.cursor])
    }

    /// Replaces the word at the cursor by `replacement`.
    pub fn replace_current_word(&mut self, replacement: &str) {
        let (start, _) = self.current_word();
        self.text.replace_range(start..self.cursor, replacement);
        self.cursor = start + replacement.len();
    }

    /// Moves the cursor one line up or down, keeping its column where possible. Returns false
    /// when there is no such line.
    pub fn vertical(&mut self, down: bool) -> bool {
        let start = self.line_start();
        let column = self.text[start..self.cursor].graphemes(true).count();
        let target_start = if down {
            let end = self.line_end();
            if end == self.text.len() {
                return false;
            }
            end + 1
        } else {
            if start == 0 {
                return false;
            }
            self.text[..start - 1]
                .rfind('\n')
                .map(|index| index + 1)
                .unwrap_or(0)
        };
        let target_end = self.text[target_start..]
            .find('\n')
            .map(|index| target_start + index)
            .unwrap_or(self.text.len());
        self.cursor = self.text[target_start..target_end]
            .grapheme_indices(true)
            .nth(column)
            .map(|(index, _)| target_start + index)
            .unwrap_or(target_end);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn composer(text: &str) -> Composer {
        let mut composer = Composer::default();
        composer.insert(text);
        composer
    }

    #[test]
    fn graphemes_move_and_delete_whole() {
        let mut composer = composer("e\u{301}👍🏽x");
        composer.left();
        composer.left();
        composer.backspace();
        assert_eq!(composer.text(), "👍🏽x");
        composer.delete();
        assert_eq!(composer.text(), "x");
    }

    #[test]
    fn emacs_editing() {
        let mut composer = composer("hello brave world");
        composer.delete_word_before();
        assert_eq!(composer.text(), "hello brave ");
        composer.home();
        composer.word_right();
        assert_eq!(composer.cursor(), 5);
        composer.kill_to_end();
        assert_eq!(composer.text(), "hello");
        composer.kill_to_start();
        assert_eq!(composer.text(), "");
    }

    #[test]
    fn multi_line_and_pastes() {
        let mut composer = composer("one\r\ntwo");
        assert_eq!(composer.text(), "one\ntwo");
        assert_eq!(composer.line_count(), 2);
        assert!(composer.vertical(false));
        assert_eq!(composer.cursor(), 3);
        assert!(!composer.vertical(false));
        assert!(composer.vertical(true));
        assert_eq!(composer.cursor(), 7);
    }

    #[test]
    fn current_word_for_completion() {
        let mut composer = composer("/invite bo");
        assert_eq!(composer.current_word(), (8, "bo"));
        composer.replace_current_word("bob ");
        assert_eq!(composer.text(), "/invite bob ");
    }
}
