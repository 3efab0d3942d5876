//! The side panes: groups (left) and members (right).

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph};

use super::wrap::{self, width};
use crate::app::State;

pub fn groups(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let rows = usize::from(area.height.saturating_sub(2));
    let first = super::groups_first_shown(state);
    let mut block = Block::default().borders(Borders::ALL).title(" Groups ");
    // When not every group fits, the bottom border says which ones are listed.
    if state.groups.len() > rows {
        let last = (first + rows).min(state.groups.len());
        block = block.title_bottom(
            Line::from(format!(" {}-{last}/{} ", first + 1, state.groups.len())).right_aligned(),
        );
    }
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let columns = usize::from(inner.width);
    let lines: Vec<Line> = state
        .groups
        .iter()
        .enumerate()
        .skip(first)
        .map(|(index, group)| {
            let number = if index < 9 {
                format!("{}", index + 1)
            } else {
                " ".into()
            };
            let mut badge = String::new();
            if group.mentioned {
                badge.push('@');
            }
            if group.unread > 0 {
                badge.push_str(&format!("{}", group.unread.min(999)));
            }
            let badge = if badge.is_empty() {
                badge
            } else {
                format!(" {badge}")
            };
            let name_width = columns.saturating_sub(width(&number) + 1 + width(&badge));
            // A shortened name keeps the start of the id that tells it from its namesakes.
            let suffix = state.name_suffix(group);
            let short = wrap::truncate(&group.name, name_width.saturating_sub(width(&suffix)));
            let name = wrap::truncate(&format!("{short}{suffix}"), name_width);
            let mut style = Style::default();
            if state.current == Some(index) {
                style = style
                    .fg(theme.accent)
                    .add_modifier(Modifier::BOLD | Modifier::REVERSED);
            } else if !group.active {
                style = style.fg(theme.system);
            } else if group.unread > 0 {
                style = style.add_modifier(Modifier::BOLD);
            }
            let padding = " ".repeat(name_width.saturating_sub(width(&name)));
            let badge_style = if group.mentioned {
                Style::default().fg(theme.mention)
            } else {
                Style::default().fg(theme.accent)
            };
            Line::from(vec![
                Span::styled(format!("{number} {name}{padding}"), style),
                Span::styled(badge, badge_style.add_modifier(Modifier::BOLD)),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(lines), inner);
}

pub fn members(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let members = state
        .current_group()
        .map(|group| group.members.as_slice())
        .unwrap_or_default();
    let block = Block::default()
        .borders(Borders::ALL)
        .title(format!(" Members ({}) ", members.len()));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let columns = usize::from(inner.width);
    let mut lines = Vec::new();
    for member in members {
        let (mark, style) = if member.name == state.me {
            ("•", Style::default().fg(theme.own))
        } else if member.key_changed {
            (
                "!",
                Style::default()
                    .fg(theme.warning)
                    .add_modifier(Modifier::BOLD),
            )
        } else if member.verified {
            ("✓", Style::default().fg(theme.own))
        } else {
            ("?", Style::default().fg(theme.system))
        };
        let you = if member.name == state.me {
            " (you)"
        } else {
            ""
        };
        let state_word = if member.name == state.me {
            ""
        } else if member.key_changed {
            " key changed"
        } else if member.verified {
            " verified"
        } else {
            " unverified"
        };
        let name = wrap::truncate(&format!("{}{you}", member.name), columns.saturating_sub(2));
        lines.push(Line::from(vec![
            Span::styled(format!("{mark} "), style),
            Span::styled(
                name,
                Style::default()
                    .fg(super::timeline::sender_color(&member.name))
                    .add_modifier(Modifier::BOLD),
            ),
        ]));
        let detail = format!(
            "  {}{state_word}",
            member
                .fingerprint
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        );
        lines.push(Line::from(Span::styled(
            wrap::truncate(&detail, columns),
            style,
        )));
    }
    frame.render_widget(Paragraph::new(lines), inner);
}
