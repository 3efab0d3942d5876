//! The timeline: messages with timestamps, day separators, stable sender colours, system
//! lines and delivery states. Only the lines that fit the view are wrapped and drawn.

use chrono::{DateTime, Datelike, NaiveDate};
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use super::wrap::{self, width};
use crate::app::{Delivery, Entry, EntryKind, GroupView, State};
use crate::config::Theme;

/// Colours senders are drawn in; a name always maps to the same one.
const SENDER_COLORS: [Color; 8] = [
    Color::LightBlue,
    Color::LightMagenta,
    Color::LightYellow,
    Color::LightCyan,
    Color::Magenta,
    Color::LightGreen,
    Color::Yellow,
    Color::LightRed,
];

/// A stable colour for a user name (FNV-1a, so it is the same on every run and machine).
pub fn sender_color(name: &str) -> Color {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
    });
    SENDER_COLORS[(hash % SENDER_COLORS.len() as u64) as usize]
}

fn local(at: i64, utc_offset: i32) -> Option<chrono::NaiveDateTime> {
    DateTime::from_timestamp(at.saturating_add(i64::from(utc_offset)), 0)
        .map(|time| time.naive_utc())
}

fn day(at: i64, utc_offset: i32) -> Option<NaiveDate> {
    local(at, utc_offset).map(|time| time.date())
}

fn clock(at: i64, utc_offset: i32) -> String {
    local(at, utc_offset)
        .map(|time| time.format("%H:%M").to_string())
        .unwrap_or_else(|| "--:--".into())
}

/// Date and time, for lines shown away from the timeline's day separators (search results).
pub(super) fn date_and_clock(at: i64, utc_offset: i32) -> String {
    local(at, utc_offset)
        .map(|time| time.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "---------- --:--".into())
}

fn separator(date: NaiveDate, columns: usize, theme: &Theme) -> Line<'static> {
    let label = format!(
        " {} {} {} {} ",
        date.weekday(),
        date.day(),
        month_name(date.month()),
        date.year()
    );
    let label = wrap::truncate(&label, columns);
    let side = columns.saturating_sub(width(&label)) / 2;
    let rule = "─".repeat(side);
    Line::from(vec![
        Span::raw(rule.clone()),
        Span::raw(label),
        Span::raw(rule),
    ])
    .style(Style::default().fg(theme.system))
}

fn month_name(month: u32) -> &'static str {
    const NAMES: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    NAMES
        .get(month.saturating_sub(1) as usize)
        .copied()
        .unwrap_or("?")
}

/// The wrapped lines of one entry.
fn entry_lines(
    entry: &Entry,
    columns: usize,
    utc_offset: i32,
    theme: &Theme,
) -> Vec<Line<'static>> {
    let time = clock(entry.at, utc_offset);
    let time_span = Span::styled(format!("{time} "), Style::default().fg(theme.system));
    match &entry.kind {
        EntryKind::System { text, warning } => {
            let style = if *warning {
                Style::default()
                    .fg(theme.warning)
                    .add_modifier(Modifier::BOLD)
            } else {
                Style::default().fg(theme.system)
            };
            let indent = width(&time) + 4;
            let body_width = columns.saturating_sub(indent).max(8);
            wrap::wrap(text, body_width)
                .into_iter()
                .enumerate()
                .map(|(index, line)| {
                    let lead = if index == 0 {
                        time_span.clone()
                    } else {
                        Span::raw(" ".repeat(width(&time) + 1))
                    };
                    let marker = if index == 0 { "-- " } else { "   " };
                    Line::from(vec![lead, Span::styled(format!("{marker}{line}"), style)])
                })
                .collect()
        }
        EntryKind::Message {
            from,
            text,
            own,
            delivery,
            mention,
        } => {
            let name_style = if *own {
                Style::default().fg(theme.own).add_modifier(Modifier::BOLD)
            } else {
                Style::default()
                    .fg(sender_color(from))
                    .add_modifier(Modifier::BOLD)
            };
            let prefix = format!("{from}: ");
            let prefix_width = width(&time) + 1 + width(&prefix);
            // A hanging indent keeps wrapped text aligned, unless the view is too narrow.
            let indent = if columns >= prefix_width + 20 {
                prefix_width
            } else {
                2
            };
            let (suffix, suffix_style) = match delivery {
                Delivery::Received | Delivery::Sent if !*own => (String::new(), Style::default()),
                Delivery::Sent => (" ✓".to_string(), Style::default().fg(theme.system)),
                Delivery::Received => (String::new(), Style::default()),
                Delivery::Sending(_) => {
                    (" …sending".to_string(), Style::default().fg(theme.system))
                }
                Delivery::Failed(reason) => (
                    format!(" ✗ failed: {reason}"),
                    Style::default().fg(theme.error),
                ),
            };
            let text_style = if *mention {
                Style::default()
                    .fg(theme.mention)
                    .add_modifier(Modifier::BOLD)
            } else {
                Style::default()
            };
            let first_width = columns.saturating_sub(prefix_width).max(1);
            let rest_width = columns.saturating_sub(indent).max(1);
            let mut lines = Vec::new();
            let mut remaining: Vec<String> = Vec::new();
            for (paragraph_index, paragraph) in text.split('\n').enumerate() {
                let wrap_width = if paragraph_index == 0 {
                    first_width
                } else {
                    rest_width
                };
                let mut wrapped = wrap::wrap(paragraph, wrap_width);
                if paragraph_index == 0 {
                    let first = wrapped.remove(0);
                    let rest = wrapped.join(" ");
                    lines.push(Line::from(vec![
                        time_span.clone(),
                        Span::styled(prefix.clone(), name_style),
                        Span::styled(first, text_style),
                    ]));
                    if !rest.is_empty() {
                        remaining.extend(wrap::wrap(&rest, rest_width));
                    }
                } else {
                    remaining.extend(wrapped);
                }
            }
            for line in remaining {
                lines.push(Line::from(vec![
                    Span::raw(" ".repeat(indent)),
                    Span::styled(line, text_style),
                ]));
            }
            if !suffix.is_empty() {
                let last_width = lines.last().map(|line| line.width()).unwrap_or(0);
                if last_width + width(&suffix) <= columns {
                    if let Some(last) = lines.last_mut() {
                        last.spans.push(Span::styled(suffix, suffix_style));
                    }
                } else {
                    for piece in wrap::wrap(suffix.trim_start(), rest_width) {
                        lines.push(Line::from(vec![
                            Span::raw(" ".repeat(indent)),
                            Span::styled(piece, suffix_style),
                        ]));
                    }
                }
            }
            lines
        }
    }
}

/// Lines entry `index` takes, with the day separator above it if the day changes there.
fn lines_with_separator(
    group: &GroupView,
    index: usize,
    columns: usize,
    utc_offset: i32,
    theme: &Theme,
) -> Vec<Line<'static>> {
    let entry = &group.entries[index];
    let mut lines = Vec::new();
    let this_day = day(entry.at, utc_offset);
    let previous_day = index
        .checked_sub(1)
        .and_then(|previous| day(group.entries[previous].at, utc_offset));
    if let Some(date) = this_day
        && previous_day != this_day
    {
        lines.push(separator(date, columns, theme));
    }
    lines.extend(entry_lines(entry, columns, utc_offset, theme));
    lines
}

/// Wrapped height of one entry of a group's timeline (with the day separator above it, if any).
pub fn entry_height(group: &GroupView, index: usize, columns: u16, utc_offset: i32) -> usize {
    lines_with_separator(
        group,
        index,
        usize::from(columns),
        utc_offset,
        &Theme::default(),
    )
    .len()
}

/// Wrapped height of a group's timeline, counted from the newest entry and stopping once it
/// reaches `needed`: scrolling only needs to know whether there is that much, so a long
/// history is never laid out in full.
pub fn content_height_up_to(
    group: &GroupView,
    columns: u16,
    utc_offset: i32,
    needed: usize,
) -> usize {
    let mut height = 0;
    for index in (0..group.entries.len()).rev() {
        height += entry_height(group, index, columns, utc_offset);
        if height >= needed {
            break;
        }
    }
    height
}

pub fn render(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let Some(group) = state.current_group() else {
        let block = Block::default().borders(Borders::ALL).title(" mlschat ");
        let hint = vec![
            Line::from("No group yet."),
            Line::from(""),
            Line::from("/create NAME  starts one"),
            Line::from("/help         lists commands"),
            Line::from(""),
            Line::from("Others add you with /invite."),
        ];
        frame.render_widget(
            Paragraph::new(hint)
                .block(block)
                .style(Style::default().fg(theme.system)),
            area,
        );
        return;
    };
    let name = state.shown_name(group);
    // A group we are out of has no current epoch: the last code we knew is history (it
    // stays in the timeline).
    let title = match (&group.epoch, &group.code) {
        _ if !group.active => format!(" {name} · not a member "),
        (Some(epoch), Some(code)) => format!(" {name} · epoch {epoch} · {code} "),
        _ => format!(" {name} "),
    };
    let block = Block::default().borders(Borders::ALL).title(wrap::truncate(
        &title,
        usize::from(area.width.saturating_sub(2)),
    ));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let columns = usize::from(inner.width);
    let rows = usize::from(inner.height);
    if rows == 0 || columns == 0 {
        return;
    }
    // Walk from the newest entry up, wrapping only until the view (plus the scroll offset) is full.
    let wanted = rows + group.scroll;
    let mut collected: Vec<Line<'static>> = Vec::new();
    for index in (0..group.entries.len()).rev() {
        let mut lines = lines_with_separator(group, index, columns, state.utc_offset, theme);
        lines.append(&mut collected);
        collected = lines;
        if collected.len() >= wanted {
            break;
        }
    }
    let scroll = group.scroll.min(collected.len().saturating_sub(rows));
    let end = collected.len() - scroll;
    let start = end.saturating_sub(rows);
    let mut visible: Vec<Line<'static>> = collected[start..end].to_vec();
    if group.scroll > 0 {
        let note = if group.new_below > 0 {
            format!(" ↓ {} new below · PageDown ", group.new_below)
        } else {
            " ↓ more below · PageDown ".to_string()
        };
        let note = Line::from(Span::styled(
            wrap::truncate(&note, columns),
            Style::default().fg(Color::Black).bg(theme.accent),
        ));
        if visible.len() == rows {
            visible.pop();
        }
        visible.push(note);
    }
    frame.render_widget(Paragraph::new(visible), inner);
}
