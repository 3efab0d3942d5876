//! The TUI's state and its pure update function: terminal input and core events come in as
//! [`Msg`], the state changes, and [`Effect`]s (commands for the core, a bell, quitting) come
//! out. Nothing here touches the terminal, the network or the disk.

pub mod composer;
pub mod keymap;

use crossterm::event::{
    KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseButton, MouseEvent, MouseEventKind,
};
use mlschat_ds::protocol::{GroupId, UserName};

use crate::commands::{self, COMMANDS, SlashCommand};
use crate::config::Settings;
use crate::core::db::HistoryEntry;
use crate::core::{Command, ConnectionState, CoreEvent, GroupRef, MemberInfo, timeline};
use composer::Composer;
use keymap::Action;

/// Entries kept in memory per group; older ones stay in the database.
pub const MAX_ENTRIES: usize = 10_000;
/// History loaded when a group is first shown (the core reads it off the UI task; the views
/// lay out only what is visible).
pub const HISTORY_PAGE: u32 = MAX_ENTRIES as u32;
/// Seconds an informational notice stays in the composer's title before the hint comes back.
pub const INFO_NOTICE_SECS: i64 = 30;
/// How often the group on screen is marked read while new messages arrive in it.
pub const READ_MARK_SECS: i64 = 10;
/// Lines one mouse-wheel step scrolls.
const WHEEL_LINES: usize = 3;
/// Input history kept for Up/Down.
const INPUT_HISTORY: usize = 200;

/// Delivery state of one of our own messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Received,
    Sending(i64),
    Sent,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Message {
        from: String,
        text: String,
        own: bool,
        delivery: Delivery,
        mention: bool,
    },
    System {
        text: String,
        warning: bool,
    },
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub at: i64,
    pub seq: Option<u64>,
    pub kind: EntryKind,
}

/// Everything the TUI knows about one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub id: GroupId,
    pub name: String,
    pub active: bool,
    pub unread: usize,
    pub mentioned: bool,
    pub entries: Vec<Entry>,
    pub members: Vec<MemberInfo>,
    pub epoch: Option<u64>,
    pub code: Option<String>,
    /// Lines scrolled up from the bottom; 0 follows new messages.
    pub scroll: usize,
    /// Entries that arrived below the view while scrolled up.
    pub new_below: usize,
    pub history_requested: bool,
    /// Joined from a Welcome: the epoch it brings gets its line (the core stores one too),
    /// though no earlier epoch is known here.
    pub announce_epoch: bool,
    /// The seq last sent to the core as read.
    pub marked_seq: u64,
}

impl GroupView {
    fn new(group: &GroupRef, active: bool) -> GroupView {
        GroupView {
            id: group.id.clone(),
            name: group.name.clone(),
            active,
            unread: 0,
            mentioned: false,
            entries: Vec::new(),
            members: Vec::new(),
            epoch: None,
            code: None,
            scroll: 0,
            new_below: 0,
            history_requested: false,
            announce_epoch: false,
            marked_seq: 0,
        }
    }

    /// The highest delivery seq among the entries on hand: what a user looking at the group
    /// has seen.
    fn seen_seq(&self) -> u64 {
        self.entries
            .iter()
            .filter_map(|entry| entry.seq)
            .max()
            .unwrap_or(0)
    }

    /// Adds an entry at the bottom. A view scrolled up stays on the lines it shows: `scroll`
    /// counts lines up from the bottom, so it grows by the new entry's height at `columns`.
    fn push(&mut self, entry: Entry, columns: u16, utc_offset: i32) {
        self.entries.push(entry);
        if self.scroll > 0 {
            self.new_below += 1;
            let last = self.entries.len() - 1;
            self.scroll += crate::ui::timeline::entry_height(self, last, columns, utc_offset);
        }
        if self.entries.len() > MAX_ENTRIES {
            let excess = self.entries.len() - MAX_ENTRIES;
            self.entries.drain(..excess);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// What covers the main screen, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// First run without `--name`: the composer asks for one.
    NamePrompt,
    Help,
    /// `/verify USER` sent; waiting for the user's fingerprint.
    VerifyRequested(String),
    Verify {
        user: String,
        theirs: String,
    },
    Search {
        text: String,
        results: Vec<HistoryEntry>,
    },
}

/// The connection as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Starting,
    Connected,
    Reconnecting(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub me: String,
    pub fingerprint: String,
    pub server: String,
    pub hosting: bool,
    pub link: Link,
    pub groups: Vec<GroupView>,
    pub current: Option<usize>,
    pub composer: Composer,
    pub status: Option<(String, Severity)>,
    /// When `status` was set (unix seconds): an informational notice clears itself after
    /// [`INFO_NOTICE_SECS`].
    pub status_since: i64,
    pub show_members: bool,
    pub mode: Mode,
    /// Lines the help or search box is scrolled down.
    pub overlay_scroll: u16,
    pub settings: Settings,
    pub input_history: Vec<String>,
    pub history_position: Option<usize>,
    pub quitting: bool,
    /// The first group the groups pane listed last time it moved (see
    /// [`crate::ui::groups_first_shown`]), so that the list moves only to keep the current
    /// group in sight.
    pub groups_top: usize,
    pub size: (u16, u16),
    /// Seconds east of UTC for timestamps (fixed in tests).
    pub utc_offset: i32,
    pub now: i64,
    /// Set when anything visible changed; the runner redraws and clears it.
    pub dirty: bool,
    /// Switch to the next group we create.
    switch_to_created: bool,
    /// The "added you to" notice on show, with its group and who added us: a group we join
    /// is named by a placeholder until the inviter's name message arrives, and the notice
    /// then takes the name.
    join_notice: Option<(GroupId, String)>,
    /// When a mention last rang the bell (unix seconds): a catch-up full of mentions rings
    /// once, not once for each.
    mention_bell_at: Option<i64>,
    /// When the current group was last marked read (unix seconds).
    read_marked_at: i64,
}

/// Inputs of [`update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Key(KeyEvent),
    Paste(String),
    Mouse(MouseEvent),
    Resize(u16, u16),
    Core(CoreEvent),
    /// Clock tick with the current unix time.
    Tick(i64),
    /// SIGTERM or similar: leave as after `/quit`.
    Terminate,
}

/// Outputs of [`update`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Core(Command),
    Bell,
    /// Repaint the whole screen.
    Clear,
    /// First run: the user chose this name; start the client.
    StartClient(UserName),
    /// Leave now (the core has stopped, or the user insisted).
    Exit,
}

impl State {
    pub fn new(settings: Settings, size: (u16, u16), utc_offset: i32, now: i64) -> State {
        State {
            me: String::new(),
            fingerprint: String::new(),
            server: String::new(),
            hosting: false,
            link: Link::Starting,
            groups: Vec::new(),
            current: None,
            composer: Composer::default(),
            status: None,
            status_since: now,
            show_members: true,
            mode: Mode::Normal,
            overlay_scroll: 0,
            settings,
            input_history: Vec::new(),
            history_position: None,
            quitting: false,
            groups_top: 0,
            size,
            utc_offset,
            now,
            dirty: true,
            switch_to_created: false,
            join_notice: None,
            mention_bell_at: None,
            read_marked_at: now,
        }
    }

    pub fn current_group(&self) -> Option<&GroupView> {
        self.current.and_then(|index| self.groups.get(index))
    }

    /// How the views name a group: its name, followed where other listed groups have the same
    /// name by the shortest start of its id (four hex digits or more) that no other group's id
    /// starts with, which is what `/switch` takes.
    pub fn shown_name(&self, group: &GroupView) -> String {
        format!("{}{}", group.name, self.name_suffix(group))
    }

    /// What [`State::shown_name`] adds to the name: ` (abcd)`, or nothing.
    pub fn name_suffix(&self, group: &GroupView) -> String {
        self.distinguishing_prefix(group)
            .map(|prefix| format!(" ({prefix})"))
            .unwrap_or_default()
    }

    /// [`State::shown_name`] of a group the core names, which may not be listed (yet).
    fn shown_name_of(&self, group: &GroupRef) -> String {
        self.groups
            .iter()
            .find(|view| view.id == group.id)
            .map_or_else(|| group.name.clone(), |view| self.shown_name(view))
    }

    /// The start of the group's id that [`State::shown_name`] adds, if it adds one.
    pub fn distinguishing_prefix(&self, group: &GroupView) -> Option<String> {
        let has_namesake = self
            .groups
            .iter()
            .any(|other| other.name == group.name && other.id != group.id);
        // Unique among all the groups, not only the namesakes: `/switch` matches ids of any.
        has_namesake.then(|| id_prefix(group, &self.groups.iter().collect::<Vec<_>>()))
    }

    fn current_group_mut(&mut self) -> Option<&mut GroupView> {
        self.current.and_then(|index| self.groups.get_mut(index))
    }

    fn group_index(&self, id: &GroupId) -> Option<usize> {
        self.groups.iter().position(|group| group.id == *id)
    }

    fn group_entry(&mut self, group: &GroupRef) -> usize {
        match self.group_index(&group.id) {
            Some(index) => {
                self.groups[index].name = group.name.clone();
                index
            }
            None => {
                self.groups.push(GroupView::new(group, true));
                self.groups.len() - 1
            }
        }
    }

    fn info(&mut self, text: impl Into<String>) {
        self.notice(text.into(), Severity::Info);
    }

    /// A group this client is out of because the DS no longer has what it needs (see
    /// `CoreEvent::OutOfSync`, `RemovalExpired` and `ServerBehind`): closed, with `why` in its
    /// timeline and as a warning.
    fn closed_with(&mut self, group: &GroupRef, why: String) {
        let index = self.group_entry(group);
        self.groups[index].active = false;
        self.system_line(index, why.clone(), true);
        let name = self.shown_name(&self.groups[index]);
        self.warn(format!("{name}: {why}"));
    }

    fn warn(&mut self, text: impl Into<String>) {
        self.notice(text.into(), Severity::Warning);
    }

    fn fail(&mut self, text: impl Into<String>) {
        self.notice(text.into(), Severity::Error);
    }

    fn notice(&mut self, text: String, severity: Severity) {
        self.status = Some((text, severity));
        self.status_since = self.now;
    }

    fn system_line(&mut self, index: usize, text: String, warning: bool) {
        let entry = Entry {
            at: self.now,
            seq: None,
            kind: EntryKind::System { text, warning },
        };
        self.push_entry(index, entry);
    }

    /// Adds an entry at the bottom of a group's timeline (see [`GroupView::push`]).
    fn push_entry(&mut self, index: usize, entry: Entry) {
        let columns = crate::ui::timeline_width(self);
        let utc_offset = self.utc_offset;
        if let Some(group) = self.groups.get_mut(index) {
            group.push(entry, columns, utc_offset);
        }
    }

    /// Makes a group current; returns the effects that loading it needs.
    fn switch_to(&mut self, index: usize) -> Vec<Effect> {
        if index >= self.groups.len() {
            return Vec::new();
        }
        // Everything in the group we leave was on screen while it was current.
        let mut effects: Vec<Effect> = self
            .current
            .filter(|&previous| previous != index)
            .and_then(|_| self.mark_read())
            .into_iter()
            .collect();
        self.current = Some(index);
        let group = &mut self.groups[index];
        group.unread = 0;
        group.mentioned = false;
        effects.push(Effect::Core(Command::Members {
            group: group.id.clone(),
        }));
        if !group.history_requested {
            group.history_requested = true;
            effects.push(Effect::Core(Command::History {
                group: group.id.clone(),
                limit: HISTORY_PAGE,
            }));
        }
        effects
    }

    /// Tells the core that the current group has been seen up to its newest entry.
    fn mark_read(&mut self) -> Option<Effect> {
        let group = self.current_group_mut()?;
        let seq = group.seen_seq();
        group.marked_seq = seq;
        let group = group.id.clone();
        self.read_marked_at = self.now;
        Some(Effect::Core(Command::MarkRead { group, seq }))
    }
}

/// Applies one input to the state.
pub fn update(state: &mut State, message: Msg) -> Vec<Effect> {
    let effects = update_state(state, message);
    state.groups_top = crate::ui::groups_first_shown(state);
    effects
}

fn update_state(state: &mut State, message: Msg) -> Vec<Effect> {
    state.dirty = true;
    match message {
        Msg::Key(key) if key.kind != KeyEventKind::Release => on_key(state, key),
        Msg::Key(_) => {
            state.dirty = false;
            Vec::new()
        }
        Msg::Paste(text) => {
            // A paste only ever lands in the composer; it is never sent by itself.
            state.composer.insert(&text);
            Vec::new()
        }
        Msg::Mouse(mouse) => on_mouse(state, mouse),
        Msg::Resize(width, height) => {
            state.size = (width, height);
            clamp_scroll(state);
            vec![Effect::Clear]
        }
        Msg::Core(event) => on_core(state, event),
        Msg::Tick(now) => {
            // Redraw only when the minute (shown in timestamps) changes, or a notice expires.
            state.dirty = now / 60 != state.now / 60;
            state.now = now;
            // Warnings and errors stay until Esc or the next notice; so does the notice that
            // says the client is quitting.
            if matches!(state.status, Some((_, Severity::Info)))
                && !state.quitting
                && now.saturating_sub(state.status_since) >= INFO_NOTICE_SECS
            {
                state.status = None;
                state.dirty = true;
            }
            // What arrives in the group on screen is read: say so now and then, so that a
            // client that never quits properly (a closed terminal, a crash) loses little.
            // Not while scrolled up with new messages below.
            let unmarked = state
                .current_group()
                .is_some_and(|group| group.new_below == 0 && group.seen_seq() > group.marked_seq);
            if unmarked && now.saturating_sub(state.read_marked_at) >= READ_MARK_SECS {
                return state.mark_read().into_iter().collect();
            }
            Vec::new()
        }
        Msg::Terminate => begin_quit(state),
    }
}

/// The shortest start of `group`'s hex id, four digits or more (or all of a shorter id),
/// that `/switch` takes to mean `group` among `all`: no other group's id starts with it and no
/// other group is named it. Where even the whole id is the start of another id, the whole id
/// (which `/switch` matches exactly first).
fn id_prefix(group: &GroupView, all: &[&GroupView]) -> String {
    let hex = group.id.to_hex();
    let others: Vec<(&str, String)> = all
        .iter()
        .filter(|other| other.id != group.id)
        .map(|other| (other.name.as_str(), other.id.to_hex()))
        .collect();
    // `/switch` takes a name over the start of an id, so another group named like the
    // prefix makes it ambiguous as much as another id starting with it.
    let ambiguous = |prefix: &str| {
        others
            .iter()
            .any(|(name, other_hex)| *name == prefix || other_hex.starts_with(prefix))
    };
    let mut length = hex.len().min(4);
    while length < hex.len() && ambiguous(&hex[..length]) {
        length += 1;
    }
    hex[..length].to_string()
}

fn begin_quit(state: &mut State) -> Vec<Effect> {
    if state.mode == Mode::NamePrompt || state.me.is_empty() {
        return vec![Effect::Exit];
    }
    if state.quitting {
        // Asked again: the core stops without waiting for the outbox any longer.
        return vec![Effect::Core(Command::Quit), Effect::Exit];
    }
    state.quitting = true;
    state.info("sending queued messages, then quitting (Ctrl+C again to quit now)");
    let mut effects: Vec<Effect> = state.mark_read().into_iter().collect();
    effects.push(Effect::Core(Command::Quit));
    effects
}

fn on_mouse(state: &mut State, mouse: MouseEvent) -> Vec<Effect> {
    match mouse.kind {
        MouseEventKind::ScrollUp => scroll(state, WHEEL_LINES as isize),
        MouseEventKind::ScrollDown => scroll(state, -(WHEEL_LINES as isize)),
        MouseEventKind::Down(MouseButton::Left)
            if matches!(state.mode, Mode::Normal | Mode::VerifyRequested(_)) =>
        {
            // A click on a group in the groups pane switches to it.
            let list = crate::ui::groups_list_area(state);
            let position = ratatui::layout::Position::new(mouse.column, mouse.row);
            if list.contains(position) {
                let index = crate::ui::groups_first_shown(state) + usize::from(mouse.row - list.y);
                return state.switch_to(index);
            }
            state.dirty = false;
        }
        _ => state.dirty = false,
    }
    Vec::new()
}

fn page(state: &State) -> usize {
    usize::from(crate::ui::timeline_height(state))
        .saturating_sub(2)
        .max(1)
}

fn scroll(state: &mut State, lines: isize) {
    if let Some(group) = state.current_group_mut() {
        group.scroll = group.scroll.saturating_add_signed(lines);
    }
    clamp_scroll(state);
}

fn clamp_scroll(state: &mut State) {
    let width = crate::ui::timeline_width(state);
    let height = usize::from(crate::ui::timeline_height(state));
    let utc_offset = state.utc_offset;
    if let Some(group) = state.current_group_mut() {
        if group.scroll == 0 {
            group.new_below = 0;
            return;
        }
        let total = crate::ui::timeline::content_height_up_to(
            group,
            width,
            utc_offset,
            group.scroll + height,
        );
        group.scroll = group.scroll.min(total.saturating_sub(height));
        if group.scroll == 0 {
            group.new_below = 0;
        }
    }
}

fn on_key(state: &mut State, key: KeyEvent) -> Vec<Effect> {
    // A terminal sends Alt+key as Esc followed by the key, so an Esc typed just before a key
    // (a fast typist, tmux, a slow link) can arrive as Alt+key. One that nothing is bound to
    // is taken as the two keys: Esc then "/kick bob" must not lose its '/' and post
    // "kick bob" to the group.
    if let KeyCode::Char(c) = key.code
        && key.modifiers - KeyModifiers::SHIFT == KeyModifiers::ALT
        && !matches!(c, '1'..='9')
        && state.settings.keymap.action(&key).is_none()
    {
        let mut effects = on_key(state, KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE));
        effects.extend(on_key(
            state,
            KeyEvent::new(KeyCode::Char(c), key.modifiers - KeyModifiers::ALT),
        ));
        return effects;
    }
    match &state.mode {
        Mode::Help | Mode::Search { .. } => {
            match key.code {
                KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') => {
                    state.mode = Mode::Normal;
                    state.overlay_scroll = 0;
                }
                KeyCode::Up => state.overlay_scroll = state.overlay_scroll.saturating_sub(1),
                KeyCode::Down => state.overlay_scroll = state.overlay_scroll.saturating_add(1),
                KeyCode::PageUp => state.overlay_scroll = state.overlay_scroll.saturating_sub(10),
                KeyCode::PageDown => state.overlay_scroll = state.overlay_scroll.saturating_add(10),
                _ => state.dirty = false,
            }
            return Vec::new();
        }
        Mode::Verify { user, .. } => {
            let user = user.clone();
            return match key.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => {
                    state.mode = Mode::Normal;
                    match UserName::new(user) {
                        Ok(user) => vec![Effect::Core(Command::Verify { user })],
                        Err(error) => {
                            state.fail(error.to_string());
                            Vec::new()
                        }
                    }
                }
                KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => {
                    state.mode = Mode::Normal;
                    state.info(format!("{user} not marked as verified"));
                    Vec::new()
                }
                _ => Vec::new(),
            };
        }
        Mode::Normal | Mode::NamePrompt | Mode::VerifyRequested(_) => {}
    }
    // Alt+1..9 jumps to a group.
    if key.modifiers.contains(KeyModifiers::ALT)
        && let KeyCode::Char(digit @ '1'..='9') = key.code
    {
        let index = usize::from(digit as u8 - b'1');
        if index < state.groups.len() {
            return state.switch_to(index);
        }
        return Vec::new();
    }
    let Some(action) = state.settings.keymap.action(&key) else {
        if let KeyCode::Char(c) = key.code
            && !key
                .modifiers
                .intersects(KeyModifiers::CONTROL | KeyModifiers::ALT)
        {
            state.composer.insert(c.encode_utf8(&mut [0; 4]));
            state.history_position = None;
        } else {
            state.dirty = false;
        }
        return Vec::new();
    };
    on_action(state, action)
}

fn on_action(state: &mut State, action: Action) -> Vec<Effect> {
    let composer = &mut state.composer;
    match action {
        Action::Send => return submit(state),
        Action::Newline => composer.insert("\n"),
        Action::Quit => return begin_quit(state),
        Action::Complete => complete(state),
        Action::HistoryPrevious => {
            if composer.line_count() > 1 && composer.vertical(false) {
                return Vec::new();
            }
            recall(state, true);
        }
        Action::HistoryNext => {
            if composer.line_count() > 1 && composer.vertical(true) {
                return Vec::new();
            }
            recall(state, false);
        }
        Action::NextGroup | Action::PreviousGroup => {
            if state.groups.is_empty() {
                return Vec::new();
            }
            let count = state.groups.len();
            let current = state.current.unwrap_or(0);
            let next = if action == Action::NextGroup {
                (current + 1) % count
            } else {
                (current + count - 1) % count
            };
            return state.switch_to(next);
        }
        Action::ScrollUp => {
            let lines = page(state) as isize;
            scroll(state, lines);
        }
        Action::ScrollDown => {
            let lines = page(state) as isize;
            scroll(state, -lines);
        }
        Action::ToggleMembers => state.show_members = !state.show_members,
        Action::Left => composer.left(),
        Action::Right => composer.right(),
        Action::WordLeft => composer.word_left(),
        Action::WordRight => composer.word_right(),
        Action::LineStart => composer.home(),
        Action::LineEnd => composer.end(),
        Action::Backspace => composer.backspace(),
        Action::Delete => composer.delete(),
        Action::DeleteWordBefore => composer.delete_word_before(),
        Action::DeleteWordAfter => composer.delete_word_after(),
        Action::KillToEnd => composer.kill_to_end(),
        Action::KillToStart => composer.kill_to_start(),
        Action::Redraw => return vec![Effect::Clear],
        Action::Cancel => {
            state.status = None;
            if matches!(state.mode, Mode::VerifyRequested(_)) {
                state.mode = Mode::Normal;
            }
        }
    }
    Vec::new()
}

fn recall(state: &mut State, older: bool) {
    if state.input_history.is_empty() {
        return;
    }
    let last = state.input_history.len() - 1;
    let position = match (state.history_position, older) {
        (None, true) => Some(last),
        (None, false) => None,
        (Some(0), true) => Some(0),
        (Some(position), true) => Some(position - 1),
        (Some(position), false) if position >= last => None,
        (Some(position), false) => Some(position + 1),
    };
    state.history_position = position;
    match position {
        Some(position) => {
            let text = state.input_history[position].clone();
            state.composer.set(&text);
        }
        None => {
            state.composer.take();
        }
    }
}

fn complete(state: &mut State) {
    let (start, word) = state.composer.current_word();
    let word = word.to_string();
    let first_word = start == 0;
    let candidates: Vec<String> = if first_word && word.starts_with('/') {
        COMMANDS
            .iter()
            .filter_map(|(usage, _)| usage.split_whitespace().next())
            .filter(|name| name.starts_with(&word))
            .map(|name| name.to_string())
            .collect()
    } else if state.composer.text().starts_with("/switch ") {
        // What `/switch` takes: the name, or for namesakes the start of the id they show.
        let mut candidates: Vec<String> = state
            .groups
            .iter()
            .filter(|group| group.name.starts_with(&word) || group.id.to_hex().starts_with(&word))
            .map(|group| {
                state
                    .distinguishing_prefix(group)
                    .unwrap_or_else(|| group.name.clone())
            })
            .collect();
        candidates.dedup();
        candidates
    } else {
        let bare = word.trim_start_matches('@');
        let prefix = &word[..word.len() - bare.len()];
        state
            .current_group()
            .map(|group| {
                group
                    .members
                    .iter()
                    .map(|member| member.name.clone())
                    .filter(|name| name.starts_with(bare) && *name != state.me)
                    .map(|name| format!("{prefix}{name}"))
                    .collect()
            })
            .unwrap_or_default()
    };
    match candidates.as_slice() {
        [] => state.info("no completion"),
        [only] => {
            let suffix = if first_word && !only.starts_with('/') {
                ": "
            } else {
                " "
            };
            state
                .composer
                .replace_current_word(&format!("{only}{suffix}"));
        }
        many => {
            let common = many
                .iter()
                .skip(1)
                .fold(many[0].clone(), |common, candidate| {
                    common
                        .chars()
                        .zip(candidate.chars())
                        .take_while(|(a, b)| a == b)
                        .map(|(a, _)| a)
                        .collect()
                });
            if common.len() > word.len() && common.starts_with(&word) {
                state.composer.replace_current_word(&common);
            }
            state.info(many.join("  "));
        }
    }
}

fn require_group(state: &mut State) -> Option<GroupId> {
    match state.current_group() {
        Some(group) => Some(group.id.clone()),
        None => {
            state.fail("no current group: /create one, or wait to be invited");
            None
        }
    }
}

fn submit(state: &mut State) -> Vec<Effect> {
    if state.composer.is_empty() {
        state.dirty = false;
        return Vec::new();
    }
    let text = state.composer.take();
    state.history_position = None;
    if state.mode == Mode::NamePrompt {
        return match UserName::new(text.trim()) {
            Ok(name) => {
                state.mode = Mode::Normal;
                state.me = name.to_string();
                vec![Effect::StartClient(name)]
            }
            Err(error) => {
                state.fail(error.to_string());
                Vec::new()
            }
        };
    }
    if state.input_history.last() != Some(&text) {
        state.input_history.push(text.clone());
        if state.input_history.len() > INPUT_HISTORY {
            state.input_history.remove(0);
        }
    }
    let command = match commands::parse(&text) {
        Ok(command) => command,
        Err(message) => {
            state.fail(message);
            return Vec::new();
        }
    };
    let command = match command {
        SlashCommand::Create(name) => {
            state.switch_to_created = true;
            Command::CreateGroup { name, id: None }
        }
        SlashCommand::Help => {
            state.mode = Mode::Help;
            return Vec::new();
        }
        SlashCommand::Quit => return begin_quit(state),
        SlashCommand::Switch(name) => {
            let matches = commands::groups_meant(
                state
                    .groups
                    .iter()
                    .map(|group| (&group.id, group.name.as_str())),
                &name,
            );
            return match matches.as_slice() {
                [index] => state.switch_to(*index),
                [] => {
                    state.fail(format!("no group named {name}"));
                    Vec::new()
                }
                _ => {
                    let matching: Vec<&GroupView> = matches
                        .iter()
                        .filter_map(|index| state.groups.get(*index))
                        .collect();
                    let all: Vec<&GroupView> = state.groups.iter().collect();
                    let choices: Vec<String> = matching
                        .iter()
                        .map(|group| format!("/switch {}", id_prefix(group, &all)))
                        .collect();
                    state.fail(format!(
                        "several groups match {name}: {}",
                        choices.join(" or ")
                    ));
                    Vec::new()
                }
            };
        }
        SlashCommand::Fingerprint(user) => Command::Fingerprint { user },
        SlashCommand::Verify(user) => {
            state.mode = Mode::VerifyRequested(user.to_string());
            Command::Fingerprint { user: Some(user) }
        }
        other => {
            let Some(group) = require_group(state) else {
                return Vec::new();
            };
            match other {
                SlashCommand::Invite(users) => Command::Invite { group, users },
                SlashCommand::Kick(user) => Command::Kick { group, user },
                SlashCommand::Leave => Command::Leave { group },
                SlashCommand::Rename(name) => {
                    // The name changes once the DS has put the rename in the group's order.
                    state.info(format!("renaming the group to {}…", name.trim()));
                    Command::Rename { group, name }
                }
                SlashCommand::Members => {
                    state.show_members = true;
                    Command::Members { group }
                }
                SlashCommand::Update => Command::Update { group },
                SlashCommand::Status => Command::Status { group },
                SlashCommand::Search(text) => Command::Search { group, text },
                SlashCommand::Message(text) => {
                    if let Some(group) = state.current_group_mut() {
                        group.scroll = 0;
                        group.new_below = 0;
                    }
                    Command::Send { group, text }
                }
                _ => return Vec::new(),
            }
        }
    };
    vec![Effect::Core(command)]
}

fn history_entry(entry: &HistoryEntry, me: &str) -> Entry {
    let kind = if entry.kind == "message" {
        let own = entry.sender == me;
        let delivery = match entry.state.as_deref() {
            None => Delivery::Received,
            Some("sent") => Delivery::Sent,
            // Still in the outbox: the core sends it and reports `Sent` with this id.
            Some("sending") => match entry.outbox_id {
                Some(outbox_id) => Delivery::Sending(outbox_id),
                None => Delivery::Failed("not sent before the client stopped".into()),
            },
            Some(other) => Delivery::Failed(other.trim_start_matches("failed: ").to_string()),
        };
        EntryKind::Message {
            from: entry.sender.clone(),
            text: entry.text.clone(),
            own,
            delivery,
            mention: false,
        }
    } else {
        EntryKind::System {
            text: entry.text.clone(),
            warning: entry.kind == "warning",
        }
    };
    Entry {
        at: entry.at,
        seq: entry.seq,
        kind,
    }
}

fn on_core(state: &mut State, event: CoreEvent) -> Vec<Effect> {
    let mut effects = Vec::new();
    match event {
        CoreEvent::Groups { groups } => {
            for listed in &groups {
                if state.group_index(&listed.group.id).is_none() {
                    let mut view = GroupView::new(&listed.group, listed.active);
                    if let Some((epoch, code)) = &listed.epoch {
                        view.epoch = Some(*epoch);
                        view.code = Some(code.clone());
                    }
                    view.unread = listed.unread;
                    view.mentioned = listed.mentioned;
                    state.groups.push(view);
                }
            }
            // Open on the group looked at last, else on the newest one.
            let last_viewed = groups
                .iter()
                .filter(|listed| listed.active && listed.viewed_at > 0)
                .max_by_key(|listed| listed.viewed_at)
                .and_then(|listed| state.group_index(&listed.group.id));
            if state.current.is_none()
                && let Some(index) =
                    last_viewed.or_else(|| state.groups.iter().rposition(|group| group.active))
            {
                effects.extend(state.switch_to(index));
            }
        }
        CoreEvent::Ready { name, fingerprint } => {
            state.me = name;
            state.fingerprint = fingerprint;
        }
        CoreEvent::Connection {
            state: link,
            detail,
        } => {
            state.link = match link {
                ConnectionState::Connected => Link::Connected,
                ConnectionState::Connecting => Link::Starting,
                ConnectionState::Reconnecting => Link::Reconnecting(detail),
            };
        }
        CoreEvent::GroupCreated { group } => {
            let index = state.group_entry(&group);
            state.system_line(index, format!("you created {}", group.name), false);
            if state.switch_to_created || state.current.is_none() {
                state.switch_to_created = false;
                effects.extend(state.switch_to(index));
            }
        }
        CoreEvent::Joined { group, by } => {
            let index = state.group_entry(&group);
            state.groups[index].active = true;
            // The Welcome's epoch gets its line, as in the stored timeline; joined again after
            // leaving, the epoch we knew is history and the new one is no change from it.
            state.groups[index].epoch = None;
            state.groups[index].code = None;
            state.groups[index].announce_epoch = true;
            state.system_line(index, timeline::added_you(&by), false);
            if state.current.is_none() {
                effects.extend(state.switch_to(index));
            } else {
                // Added again to the group on screen, whose list emptied when we left it: the
                // member pane and the status bar need it now, not at the next switch.
                effects.push(Effect::Core(Command::Members {
                    group: group.id.clone(),
                }));
                if state.current != Some(index) {
                    state.groups[index].unread += 1;
                    let name = state.shown_name(&state.groups[index]);
                    state.info(format!("{by} added you to {name}"));
                    state.join_notice = Some((group.id.clone(), by));
                }
            }
        }
        CoreEvent::GroupRenamed { group, by } => {
            let notice = state
                .join_notice
                .as_ref()
                .filter(|(id, _)| by.is_none() && *id == group.id)
                .map(|(_, inviter)| inviter.clone())
                .zip(state.status.as_ref().map(|(text, _)| text.clone()));
            let index = state.group_entry(&group);
            // The notice still on show named the group by its placeholder.
            if let Some((inviter, shown)) = notice
                && shown.starts_with(&format!("{inviter} added you to "))
            {
                let name = state.shown_name(&state.groups[index]);
                state.info(format!("{inviter} added you to {name}"));
                state.join_notice = None;
            }
            if let Some(by) = by {
                let text = timeline::renamed(&by, &state.me, &group.name);
                state.system_line(index, text, false);
                // Our rename is done: the "renaming…" notice has said all it had to.
                if by == state.me && matches!(state.status, Some((_, Severity::Info))) {
                    state.status = None;
                }
            }
        }
        CoreEvent::RenameOvertaken { group, by, name } => {
            let index = state.group_entry(&group);
            let text = timeline::rename_overtaken(&by, &state.me, &name, &group.name);
            state.system_line(index, text, false);
            // Our rename is done, but the name is another member's: say so where the user looks,
            // whichever group is on screen.
            if by == state.me && name != group.name {
                state.info(format!(
                    "the group is called {}: a rename came after yours to {name}",
                    group.name
                ));
            } else if by == state.me && matches!(state.status, Some((_, Severity::Info))) {
                state.status = None;
            }
        }
        CoreEvent::MemberAdded { group, user, by } => {
            let index = state.group_entry(&group);
            state.system_line(index, timeline::member_added(&by, &user), false);
            effects.push(Effect::Core(Command::Members { group: group.id }));
        }
        CoreEvent::MemberRemoved { group, user, by } => {
            let index = state.group_entry(&group);
            // Our own removal gets its line from `Left`.
            if user != state.me {
                state.system_line(index, timeline::member_removed(&by, &user), false);
            }
            effects.push(Effect::Core(Command::Members { group: group.id }));
        }
        CoreEvent::LeaveRequested { group } => {
            let name = state.shown_name_of(&group);
            state.info(format!(
                "leaving {name}: you are out once another member's client takes your leave"
            ));
        }
        CoreEvent::OutOfSync { group } => state.closed_with(&group, timeline::out_of_sync()),
        CoreEvent::RemovalExpired { group } => {
            state.closed_with(&group, timeline::removal_missed());
        }
        CoreEvent::ServerBehind {
            group,
            server_epoch,
            epoch,
        } => state.closed_with(&group, timeline::server_behind(server_epoch, epoch)),
        CoreEvent::Left { group, by } => {
            let index = state.group_entry(&group);
            state.groups[index].active = false;
            // "leaving…" is over.
            if by == state.me && matches!(state.status, Some((_, Severity::Info))) {
                state.status = None;
            }
            let text = timeline::left(&by, &state.me);
            state.system_line(index, text, true);
        }
        CoreEvent::Message {
            group,
            from,
            text,
            seq,
            at,
        } => {
            let index = state.group_entry(&group);
            let mention = from != state.me && timeline::mentions(&state.me, &text);
            let is_current = state.current == Some(index);
            state.push_entry(
                index,
                Entry {
                    at,
                    seq: Some(seq),
                    kind: EntryKind::Message {
                        from,
                        text,
                        own: false,
                        delivery: Delivery::Received,
                        mention,
                    },
                },
            );
            let view = &mut state.groups[index];
            if !is_current {
                view.unread += 1;
            }
            if mention {
                if !is_current {
                    view.mentioned = true;
                }
                if state.mention_bell_at != Some(state.now) {
                    state.mention_bell_at = Some(state.now);
                    effects.push(Effect::Bell);
                }
            }
        }
        CoreEvent::Queued {
            group,
            local_id,
            text,
        } => {
            let index = state.group_entry(&group);
            let now = state.now;
            let me = state.me.clone();
            state.push_entry(
                index,
                Entry {
                    at: now,
                    seq: None,
                    kind: EntryKind::Message {
                        from: me,
                        text,
                        own: true,
                        delivery: Delivery::Sending(local_id),
                        mention: false,
                    },
                },
            );
        }
        CoreEvent::Sent {
            group,
            local_id,
            seq,
        } => settle(state, &group, local_id, Some(seq), Delivery::Sent),
        CoreEvent::Failed {
            group,
            local_id,
            reason,
        } => {
            let name = state.shown_name_of(&group);
            state.fail(format!("a message to {name} failed: {reason}"));
            settle(state, &group, local_id, None, Delivery::Failed(reason));
        }
        CoreEvent::Members { group, members } => {
            let index = state.group_entry(&group);
            state.groups[index].members = members;
        }
        CoreEvent::EpochChanged { group, epoch, code } => {
            let index = state.group_entry(&group);
            let changed = std::mem::take(&mut state.groups[index].announce_epoch)
                || state.groups[index]
                    .epoch
                    .is_some_and(|previous| previous != epoch);
            state.groups[index].epoch = Some(epoch);
            state.groups[index].code = Some(code.clone());
            if changed {
                state.system_line(index, timeline::new_epoch(epoch, &code), false);
            }
        }
        CoreEvent::KeyChanged {
            user,
            fingerprint,
            group,
        } => {
            let text = timeline::key_changed(&user, &fingerprint);
            // The group whose commit showed the key gets the line even though its member list
            // has not been reloaded yet (the user may have just been added).
            let seen_in = group.map(|group| state.group_entry(&group));
            for index in 0..state.groups.len() {
                if Some(index) == seen_in
                    || state.groups[index]
                        .members
                        .iter()
                        .any(|member| member.name == user)
                {
                    state.system_line(index, text.clone(), true);
                    effects.push(Effect::Core(Command::Members {
                        group: state.groups[index].id.clone(),
                    }));
                }
            }
            state.warn(text);
            effects.push(Effect::Bell);
        }
        CoreEvent::Fingerprint {
            user,
            fingerprint,
            verified,
            key_changed,
        } => {
            if state.mode == Mode::VerifyRequested(user.clone()) {
                state.mode = Mode::Verify {
                    user,
                    theirs: fingerprint,
                };
            } else {
                let mark = if key_changed {
                    " (KEY CHANGED)"
                } else if verified {
                    " (verified)"
                } else {
                    ""
                };
                state.info(format!("{user}: {fingerprint}{mark}"));
            }
        }
        CoreEvent::Verified { user } => {
            state.info(format!("{user} is now verified"));
            if let Some(group) = state.current_group() {
                effects.push(Effect::Core(Command::Members {
                    group: group.id.clone(),
                }));
            }
        }
        CoreEvent::Status {
            group,
            ciphersuite,
            epoch,
            code,
            members,
            ..
        } => {
            let name = state.shown_name_of(&group);
            state.info(format!(
                "{name}: {ciphersuite}, epoch {epoch}, code {code}, {members} members"
            ));
        }
        CoreEvent::History { group, entries } => {
            let index = state.group_entry(&group);
            let me = state.me.clone();
            let view = &mut state.groups[index];
            let newest = entries
                .iter()
                .filter_map(|entry| entry.seq)
                .max()
                .unwrap_or(0);
            let live: Vec<Entry> = std::mem::take(&mut view.entries)
                .into_iter()
                .filter(|entry| entry.seq.is_none_or(|seq| seq > newest))
                .filter(|entry| !matches!(entry.kind, EntryKind::System { .. }))
                .collect();
            view.entries = entries
                .iter()
                .map(|entry| history_entry(entry, &me))
                .collect();
            view.entries.extend(live);
        }
        CoreEvent::SearchResults { text, entries, .. } => {
            state.mode = Mode::Search {
                text,
                results: entries,
            };
        }
        CoreEvent::Error { message } => {
            if matches!(state.mode, Mode::VerifyRequested(_)) {
                state.mode = Mode::Normal;
            }
            state.fail(message);
        }
        CoreEvent::Stopped => effects.push(Effect::Exit),
    }
    effects
}

fn settle(
    state: &mut State,
    group: &GroupRef,
    local_id: i64,
    seq: Option<u64>,
    delivery: Delivery,
) {
    let Some(index) = state.group_index(&group.id) else {
        return;
    };
    for entry in state.groups[index].entries.iter_mut().rev() {
        if let EntryKind::Message {
            delivery: current @ Delivery::Sending(_),
            ..
        } = &mut entry.kind
            && *current == Delivery::Sending(local_id)
        {
            *current = delivery;
            if seq.is_some() {
                entry.seq = seq;
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests;
