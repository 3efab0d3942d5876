//! Display-width-aware line wrapping: CJK and emoji take two columns, combining marks none,
//! and a grapheme is never split across lines.

use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

/// Display width of a string in terminal columns.
pub fn width(text: &str) -> usize {
    text.width()
}

/// Wraps `text` into lines of at most `width` columns, breaking after spaces where possible
/// and inside words only when a word is wider than a line. Newlines always break.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    for paragraph in text.split('\n') {
        let mut line = String::new();
        let mut line_width = 0;
        for word in paragraph.split_word_bounds() {
            let word_width = word.width();
            if line_width + word_width <= width {
                line.push_str(word);
                line_width += word_width;
                continue;
            }
            if word.trim().is_empty() {
                // A space at a break point is dropped rather than starting the next line.
                lines.push(std::mem::take(&mut line));
                line_width = 0;
                continue;
            }
            if !line.is_empty() && word_width <= width {
                lines.push(std::mem::take(&mut line).trim_end().to_string());
                line_width = 0;
            }
            for grapheme in word.graphemes(true) {
                let grapheme_width = grapheme.width();
                if line_width + grapheme_width > width && !line.is_empty() {
                    lines.push(std::mem::take(&mut line));
                    line_width = 0;
                }
                line.push_str(grapheme);
                line_width += grapheme_width;
            }
        }
        lines.push(line);
    }
    lines
}

/// Cuts `text` to at most `width` columns, marking a cut with '…'.
pub fn truncate(text: &str, width: usize) -> String {
    if text.width() <= width {
        return text.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for grapheme in text.graphemes(true) {
        let grapheme_width = grapheme.width();
        if used + grapheme_width + 1 > width {
            break;
        }
        out.push_str(grapheme);
        used += grapheme_width;
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces_and_respects_width() {
        assert_eq!(
            wrap("hello brave new world", 11),
            vec!["hello brave", "new world"]
        );
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("a\nb", 10), vec!["a", "b"]);
        assert_eq!(wrap("", 10), vec![""]);
    }

    #[test]
    fn wide_and_combining_characters() {
        // Each CJK character is two columns wide.
        let lines = wrap("漢字漢字漢字", 5);
        assert!(lines.iter().all(|line| width(line) <= 5), "{lines:?}");
        assert_eq!(lines.concat(), "漢字漢字漢字");
        // A combining accent stays with its letter.
        let lines = wrap("e\u{301}e\u{301}e\u{301}", 2);
        assert_eq!(lines, vec!["e\u{301}e\u{301}", "e\u{301}"]);
        // An emoji with a skin-tone modifier is one grapheme.
        assert_eq!(wrap("👍🏽👍🏽", 2).len(), 2);
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("a longer name", 6), "a lon…");
        assert!(width(&truncate("漢字漢字", 5)) <= 5);
    }
}
