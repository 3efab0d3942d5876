//! Boxes drawn over the main screen: help, fingerprint verification, search results, and
//! the first-run name prompt.

use ratatui::Frame;
use ratatui::layout::{Constraint, Flex, Layout, Position, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph, Wrap};

use super::wrap;
use crate::app::{Mode, State};
use crate::commands::COMMANDS;

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let [row] = Layout::vertical([Constraint::Length(height.min(area.height))])
        .flex(Flex::Center)
        .areas(area);
    let [cell] = Layout::horizontal([Constraint::Length(width.min(area.width))])
        .flex(Flex::Center)
        .areas(row);
    cell
}

pub fn render(state: &State, frame: &mut Frame, area: Rect) {
    match &state.mode {
        Mode::Help => help(state, frame, area),
        Mode::Verify { user, theirs } => verify(state, frame, area, user, theirs),
        Mode::Search { text, results } => search(state, frame, area, text, results),
        Mode::Normal | Mode::NamePrompt | Mode::VerifyRequested(_) => {}
    }
}

fn help(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let box_area = centered(
        area,
        area.width.saturating_sub(4).min(76),
        area.height.saturating_sub(2),
    );
    // Narrow screens put each description under its name instead of beside it. A description
    // that wraps goes on under where it started, not under the names.
    let narrow = box_area.width < 60;
    let inner_width = usize::from(box_area.width.saturating_sub(2));
    let indent = if narrow { 6 } else { 23 };
    let entry = |name: &str, description: String| -> Vec<Line<'static>> {
        let name = Span::styled(format!("  {name:<20} "), Style::default().fg(theme.accent));
        let pad = " ".repeat(indent);
        let mut text =
            wrap::wrap(&description, inner_width.saturating_sub(indent).max(10)).into_iter();
        let first = text.next().unwrap_or_default();
        let mut lines = if narrow {
            vec![Line::from(name), Line::from(format!("{pad}{first}"))]
        } else {
            vec![Line::from(vec![name, Span::raw(first)])]
        };
        lines.extend(text.map(|more| Line::from(format!("{pad}{more}"))));
        lines
    };
    let bold = Style::default().add_modifier(Modifier::BOLD);
    let mut lines = vec![Line::from(Span::styled("Commands", bold))];
    for (usage, description) in COMMANDS {
        lines.extend(entry(usage, description.to_string()));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled("Keys", bold)));
    for (action, keys) in state.settings.keymap.describe() {
        lines.extend(entry(action.name(), keys.join(", ")));
    }
    lines.extend(entry("group 1-9", "Alt+1 … Alt+9".to_string()));
    lines.push(Line::from(""));
    lines.push(Line::from(
        "Lines not starting with / are messages; // sends a leading slash.",
    ));
    frame.render_widget(Clear, box_area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((state.overlay_scroll, 0))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(" Help · ↑↓ PgUp PgDn scroll · Esc closes "),
            ),
        box_area,
    );
}

fn verify(state: &State, frame: &mut Frame, area: Rect, user: &str, theirs: &str) {
    let theme = &state.settings.theme;
    let box_area = centered(
        area,
        area.width.saturating_sub(2).min(72),
        11.min(area.height),
    );
    let inner_width = usize::from(box_area.width.saturating_sub(2));
    let column = inner_width / 2;
    let wrap_print = |print: &str| wrap::wrap(print, column.saturating_sub(1).max(5));
    let ours = wrap_print(&state.fingerprint);
    let theirs_lines = wrap_print(theirs);
    let mut lines = vec![
        Line::from(format!(
            "Compare {user}'s fingerprint with what {user} reads out."
        )),
        Line::from(vec![
            Span::styled(
                format!("{:<column$}", "yours"),
                Style::default().add_modifier(Modifier::BOLD),
            ),
            Span::styled(
                user.to_string(),
                Style::default().add_modifier(Modifier::BOLD),
            ),
        ]),
    ];
    for index in 0..ours.len().max(theirs_lines.len()) {
        let left = ours.get(index).cloned().unwrap_or_default();
        let right = theirs_lines.get(index).cloned().unwrap_or_default();
        lines.push(Line::from(vec![
            Span::raw(format!("{left:<column$}")),
            Span::styled(right, Style::default().fg(theme.accent)),
        ]));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        format!("Do they match? y: mark {user} verified · n: cancel"),
        Style::default().fg(theme.mention),
    )));
    frame.render_widget(Clear, box_area);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" /verify {user} ")),
        ),
        box_area,
    );
}

fn search(
    state: &State,
    frame: &mut Frame,
    area: Rect,
    text: &str,
    results: &[crate::core::db::HistoryEntry],
) {
    let theme = &state.settings.theme;
    let box_area = centered(
        area,
        area.width.saturating_sub(4),
        area.height.saturating_sub(2),
    );
    let inner_width = usize::from(box_area.width.saturating_sub(2));
    let mut lines: Vec<Line> = Vec::new();
    if results.is_empty() {
        lines.push(Line::from(format!("No message contains {text:?}.")));
    }
    let rows = usize::from(box_area.height.saturating_sub(2));
    for entry in results.iter().rev().take(rows).rev() {
        let stamp = format!(
            "{} ",
            super::timeline::date_and_clock(entry.at, state.utc_offset)
        );
        let line = format!("{}: {}", entry.sender, entry.text.replace('\n', " "));
        let line = wrap::truncate(&line, inner_width.saturating_sub(wrap::width(&stamp)));
        lines.push(Line::from(vec![
            Span::styled(stamp, Style::default().fg(theme.system)),
            Span::styled(
                line,
                Style::default().fg(super::timeline::sender_color(&entry.sender)),
            ),
        ]));
    }
    frame.render_widget(Clear, box_area);
    frame.render_widget(
        Paragraph::new(lines).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(
                    " search {text:?}: {} found · Esc closes ",
                    results.len()
                ))
                .border_style(Style::default().fg(theme.accent)),
        ),
        box_area,
    );
}

pub fn name_prompt(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let box_area = centered(area, area.width.saturating_sub(2).min(60), 8);
    let mut lines = vec![
        Line::from("Welcome to mlschat."),
        Line::from("Choose your user name (lowercase letters, digits, _ - .):"),
        Line::from(""),
        Line::from(Span::styled(
            format!("> {}", state.composer.text()),
            Style::default().add_modifier(Modifier::BOLD),
        )),
    ];
    if let Some((message, _)) = &state.status {
        lines.push(Line::from(Span::styled(
            message.clone(),
            Style::default().fg(theme.error),
        )));
    }
    frame.render_widget(Clear, box_area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(Block::default().borders(Borders::ALL).title(" mlschat ")),
        box_area,
    );
    let cursor_x = box_area.x
        + 3
        + u16::try_from(wrap::width(
            &state.composer.text()[..state.composer.cursor()],
        ))
        .unwrap_or(0);
    frame.set_cursor_position(Position::new(
        cursor_x.min(box_area.right().saturating_sub(2)),
        box_area.y + 4,
    ));
}
