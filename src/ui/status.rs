//! The status bar: connection, server, current group, members, epoch and verification code,
//! and the user's own fingerprint.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use super::wrap;
use crate::app::{Link, State};

pub fn render(state: &State, frame: &mut Frame, area: Rect) {
    let theme = &state.settings.theme;
    let base = Style::default().bg(theme.status_bar).fg(Color::White);
    let (link, link_color) = match &state.link {
        Link::Starting => ("● connecting".to_string(), Color::Yellow),
        Link::Connected => ("● connected".to_string(), Color::LightGreen),
        Link::Reconnecting(_) => ("● reconnecting".to_string(), Color::LightRed),
    };
    let mut spans = vec![Span::styled(
        format!(" {link} "),
        base.fg(link_color).add_modifier(Modifier::BOLD),
    )];
    let mut parts = Vec::new();
    if state.hosting {
        parts.push(format!("hosting local DS {}", state.server));
    } else if !state.server.is_empty() {
        parts.push(state.server.clone());
    }
    if let Some(group) = state.current_group() {
        let members = if group.active {
            match group.members.len() {
                1 => "1 member".to_string(),
                count => format!("{count} members"),
            }
        } else {
            "not a member".to_string()
        };
        parts.push(match state.distinguishing_prefix(group) {
            Some(prefix) => format!("{} ({prefix}, {members})", group.name),
            None => format!("{} ({members})", group.name),
        });
        if let (true, Some(epoch), Some(code)) = (group.active, group.epoch, &group.code) {
            parts.push(format!("epoch {epoch} · code {code}"));
        }
    }
    if !state.fingerprint.is_empty() {
        let short: Vec<&str> = state.fingerprint.split(' ').take(3).collect();
        parts.push(format!("you {} {}…", state.me, short.join(" ")));
    }
    let used = wrap::width(&spans[0].content);
    let rest = wrap::truncate(
        &parts.join(" │ "),
        usize::from(area.width).saturating_sub(used + 1),
    );
    spans.push(Span::styled(format!("{rest} "), base));
    frame.render_widget(Paragraph::new(Line::from(spans)).style(base), area);
}
