//! The composer box: the text being typed, hard-wrapped by grapheme so the cursor lands
//! exactly, with the status message in its title.

use ratatui::Frame;
use ratatui::layout::{Position, Rect};
use ratatui::style::Style;
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Paragraph};
use unicode_segmentation::UnicodeSegmentation;
use unicode_width::UnicodeWidthStr;

use super::wrap;
use crate::app::{Mode, Severity, State};

/// One visual row of the composer: where it starts in the text, and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub start: usize,
    pub end: usize,
}

/// Splits the text into rows of at most `width` columns.
pub fn rows(text: &str, width: u16) -> Vec<Row> {
    let width = usize::from(width.max(1));
    let mut rows = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (index, grapheme) in text.grapheme_indices(true) {
        if grapheme == "\n" {
            rows.push(Row { start, end: index });
            start = index + 1;
            used = 0;
            continue;
        }
        let grapheme_width = grapheme.width();
        if used + grapheme_width > width && used > 0 {
            rows.push(Row { start, end: index });
            start = index;
            used = 0;
        }
        used += grapheme_width;
    }
    rows.push(Row {
        start,
        end: text.len(),
    });
    rows
}

/// Row and column of the cursor.
fn cursor_position(text: &str, rows: &[Row], cursor: usize) -> (usize, usize) {
    for (index, row) in rows.iter().enumerate() {
        let next_start = rows.get(index + 1).map(|next| next.start);
        let within = cursor >= row.start
            && (cursor <= row.end)
            && next_start.is_none_or(|next| cursor < next || cursor == row.end && next > row.end);
        if within {
            return (index, text[row.start..cursor.min(row.end)].width());
        }
    }
    (rows.len().saturating_sub(1), 0)
}

pub fn render(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let title_width = usize::from(area.width.saturating_sub(4));
    let (title, title_style) = match &state.status {
        Some((text, severity)) => {
            let color = match severity {
                Severity::Info => theme.accent,
                Severity::Warning => theme.warning,
                Severity::Error => theme.error,
            };
            (
                format!(
                    " {} ",
                    wrap::truncate(&text.replace('\n', " "), title_width)
                ),
                Style::default().fg(color),
            )
        }
        None => {
            let hint = match state.current_group() {
                Some(group) if !group.active => " you are no longer in this group ".to_string(),
                Some(group) => format!(" message {} ", state.shown_name(group)),
                None => " /create NAME · /help ".to_string(),
            };
            (
                wrap::truncate(&hint, title_width),
                Style::default().fg(theme.system),
            )
        }
    };
    let block = Block::default()
        .borders(Borders::ALL)
        .title(ratatui::text::Span::styled(title, title_style));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    if inner.width == 0 || inner.height == 0 {
        return;
    }
    let text = state.composer.text();
    let all_rows = rows(text, inner.width);
    let (cursor_row, cursor_column) = cursor_position(text, &all_rows, state.composer.cursor());
    let height = usize::from(inner.height);
    let first = (cursor_row + 1).saturating_sub(height);
    let lines: Vec<Line> = all_rows[first..]
        .iter()
        .take(height)
        .map(|row| Line::from(text[row.start..row.end].to_string()))
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
    if matches!(state.mode, Mode::Normal | Mode::VerifyRequested(_)) {
        let x = inner.x
            + u16::try_from(cursor_column)
                .unwrap_or(u16::MAX)
                .min(inner.width.saturating_sub(1));
        let y = inner.y + u16::try_from(cursor_row - first).unwrap_or(0);
        frame.set_cursor_position(Position::new(x, y));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_wrap_and_break_on_newlines() {
        let rows = rows("abcdef\ngh", 4);
        assert_eq!(
            rows,
            vec![
                Row { start: 0, end: 4 },
                Row { start: 4, end: 6 },
                Row { start: 7, end: 9 }
            ]
        );
    }

    #[test]
    fn cursor_lands_after_wide_characters() {
        let text = "漢字x";
        let all = rows(text, 10);
        assert_eq!(cursor_position(text, &all, "漢字".len()), (0, 4));
        let all = rows("abcd", 4);
        assert_eq!(cursor_position("abcd", &all, 4), (0, 4));
    }
}
