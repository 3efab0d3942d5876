//! Views: pure functions from [`State`] to a frame. Nothing here changes state.

mod composer;
mod overlays;
mod panes;
mod status;
pub mod timeline;
pub mod wrap;

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::Style;
use ratatui::widgets::Paragraph;

use crate::app::State;

/// The smallest screen the layout is designed for.
pub const MIN_WIDTH: u16 = 40;
pub const MIN_HEIGHT: u16 = 12;
/// The composer grows with its text up to this many lines.
const MAX_COMPOSER_LINES: u16 = 5;

/// Where each part of the screen goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Areas {
    pub groups: Rect,
    pub timeline: Rect,
    pub members: Option<Rect>,
    pub composer: Rect,
    pub status: Rect,
}

fn composer_height(state: &State, width: u16) -> u16 {
    let inner = width.saturating_sub(2).max(1);
    let rows = composer::rows(state.composer.text(), inner).len() as u16;
    rows.clamp(1, MAX_COMPOSER_LINES) + 2
}

pub fn areas(state: &State, area: Rect) -> Areas {
    let [main, composer, status] = Layout::vertical([
        Constraint::Min(1),
        Constraint::Length(composer_height(state, area.width)),
        Constraint::Length(1),
    ])
    .areas(area);
    let groups_width = (area.width / 5).clamp(10, 22);
    let members_width = if state.show_members && area.width >= 70 {
        (area.width / 4).clamp(20, 30)
    } else {
        0
    };
    let [groups, timeline, members] = Layout::horizontal([
        Constraint::Length(groups_width),
        Constraint::Min(10),
        Constraint::Length(members_width),
    ])
    .areas(main);
    Areas {
        groups,
        timeline,
        members: (members_width > 0).then_some(members),
        composer,
        status,
    }
}

fn screen(state: &State) -> Rect {
    Rect::new(0, 0, state.size.0, state.size.1)
}

/// Rows of the timeline's text area (inside its border).
pub fn timeline_height(state: &State) -> u16 {
    areas(state, screen(state))
        .timeline
        .height
        .saturating_sub(2)
}

/// Columns of the timeline's text area (inside its border).
pub fn timeline_width(state: &State) -> u16 {
    areas(state, screen(state)).timeline.width.saturating_sub(2)
}

/// The groups pane's list area (inside its border); empty when the terminal is too small to
/// draw anything but a notice.
pub fn groups_list_area(state: &State) -> Rect {
    if state.size.0 < MIN_WIDTH || state.size.1 < MIN_HEIGHT {
        return Rect::default();
    }
    let pane = areas(state, screen(state)).groups;
    Rect::new(
        pane.x.saturating_add(1),
        pane.y.saturating_add(1),
        pane.width.saturating_sub(2),
        pane.height.saturating_sub(2),
    )
}

/// The first group the groups pane lists: where it listed from last time, moved only as far
/// as it takes to show the current group, and never leaving rows empty below the last group.
pub fn groups_first_shown(state: &State) -> usize {
    let rows = usize::from(groups_list_area(state).height);
    if rows == 0 {
        // Nothing is listed (a notice fills the screen): keep the list where it was.
        return state.groups_top;
    }
    let top = state
        .groups_top
        .min(state.groups.len().saturating_sub(rows));
    match state.current {
        Some(current) => top.clamp((current + 1).saturating_sub(rows), current),
        None => top,
    }
}

/// Draws the whole screen.
pub fn render(state: &State, frame: &mut Frame) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        let message = format!(
            "mlschat needs at least {MIN_WIDTH}x{MIN_HEIGHT}; this terminal is {}x{}",
            area.width, area.height
        );
        frame.render_widget(
            Paragraph::new(message)
                .wrap(ratatui::widgets::Wrap { trim: true })
                .style(Style::default()),
            area,
        );
        return;
    }
    if state.mode == crate::app::Mode::NamePrompt {
        overlays::name_prompt(state, frame, area);
        return;
    }
    let areas = areas(state, area);
    panes::groups(state, frame, areas.groups);
    timeline::render(state, frame, areas.timeline);
    if let Some(members) = areas.members {
        panes::members(state, frame, members);
    }
    composer::render(state, frame, areas.composer);
    status::render(state, frame, areas.status);
    overlays::render(state, frame, area);
}

#[cfg(test)]
mod tests;
