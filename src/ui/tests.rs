//! Snapshot tests of the rendered screen (ratatui's TestBackend) at 80x24 and 40x12. Times,
//! fingerprints and the UTC offset are fixed, so the snapshots need no filters.

use mlschat_ds::protocol::GroupId;
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use crate::app::{Effect, Mode, Msg, State, update};
use crate::config::Settings;
use crate::core::{ConnectionState, CoreEvent, GroupRef, MemberInfo};

/// 2025-11-28 21:50 UTC, the evening before the snapshots' second day.
const EVENING: i64 = 1_764_366_600;
const NEXT_MORNING: i64 = EVENING + 12 * 3600;

fn team() -> GroupRef {
    GroupRef {
        id: GroupId::new(vec![0xab; 16]).expect("valid id"),
        name: "team".into(),
    }
}

fn other() -> GroupRef {
    GroupRef {
        id: GroupId::new(vec![0xcd; 16]).expect("valid id"),
        name: "ops-oncall".into(),
    }
}

fn member(name: &str, fingerprint: &str, verified: bool, key_changed: bool) -> MemberInfo {
    MemberInfo {
        name: name.into(),
        fingerprint: fingerprint.into(),
        verified,
        key_changed,
    }
}

fn feed(state: &mut State, events: Vec<CoreEvent>) {
    for event in events {
        let _effects: Vec<Effect> = update(state, Msg::Core(event));
    }
}

fn message(from: &str, text: &str, seq: u64, at: i64) -> CoreEvent {
    CoreEvent::Message {
        group: team(),
        from: from.into(),
        text: text.into(),
        seq,
        at,
    }
}

/// A session with two groups, members and a varied timeline.
fn session(width: u16, height: u16) -> State {
    let mut state = State::new(Settings::default(), (width, height), 0, EVENING);
    state.server = "127.0.0.1:4433".into();
    feed(
        &mut state,
        vec![
            CoreEvent::Ready {
                name: "alice".into(),
                fingerprint: "31415 92653 58979 32384 62643 38327".into(),
            },
            CoreEvent::Connection {
                state: ConnectionState::Connected,
                detail: String::new(),
            },
            CoreEvent::GroupCreated { group: team() },
            CoreEvent::Joined {
                group: other(),
                by: "dave".into(),
            },
            CoreEvent::EpochChanged {
                group: team(),
                epoch: 3,
                code: "482 913".into(),
            },
            CoreEvent::Members {
                group: team(),
                members: vec![
                    member("alice", "31415 92653 58979", true, false),
                    member("bob", "27182 81828 45904", true, false),
                    member("carol", "16180 33988 74989", false, false),
                    member("mallory", "66666 13131 00000", false, true),
                ],
            },
            message("bob", "evening all", 1, EVENING),
        ],
    );
    state.now = NEXT_MORNING;
    feed(
        &mut state,
        vec![
            message("carol", "漢字かな交じり文も大丈夫", 2, NEXT_MORNING),
            message(
                "bob",
                "emoji 👍🏽 🎉 👩‍👩‍👧 and combining: e\u{301}le\u{300}ve, cafe\u{301}",
                3,
                NEXT_MORNING + 60,
            ),
            message(
                "carol",
                "a long message that has to wrap over several lines of the timeline because it keeps going and going, well past the width of any reasonable terminal",
                4,
                NEXT_MORNING + 120,
            ),
        ],
    );
    state.now = NEXT_MORNING + 150;
    feed(
        &mut state,
        vec![
            CoreEvent::Queued {
                group: team(),
                local_id: 1,
                text: "on my way".into(),
            },
            CoreEvent::Sent {
                group: team(),
                local_id: 1,
                seq: 5,
            },
            CoreEvent::Queued {
                group: team(),
                local_id: 2,
                text: "@bob did you see?".into(),
            },
            CoreEvent::Queued {
                group: team(),
                local_id: 3,
                text: "this one failed".into(),
            },
            CoreEvent::Failed {
                group: team(),
                local_id: 3,
                reason: "not a member".into(),
            },
            message("bob", "alice: yes!", 6, NEXT_MORNING + 180),
        ],
    );
    state.status = None;
    state
}

fn render(state: &State) -> String {
    let mut terminal =
        Terminal::new(TestBackend::new(state.size.0, state.size.1)).expect("test terminal");
    terminal
        .draw(|frame| super::render(state, frame))
        .expect("draw");
    terminal.backend().to_string()
}

#[test]
fn main_screen_80x24() {
    insta::assert_snapshot!(render(&session(80, 24)));
}

#[test]
fn main_screen_40x12() {
    insta::assert_snapshot!(render(&session(40, 12)));
}

#[test]
fn member_pane_and_key_change_warning_100x30() {
    let mut state = session(100, 30);
    feed(
        &mut state,
        vec![CoreEvent::KeyChanged {
            group: None,
            user: "mallory".into(),
            fingerprint: "66666 13131 00000".into(),
        }],
    );
    insta::assert_snapshot!(render(&state));
}

#[test]
fn a_group_we_were_removed_from_shows_no_epoch_or_members() {
    let mut state = session(80, 24);
    feed(
        &mut state,
        vec![
            CoreEvent::Left {
                group: team(),
                by: "bob".into(),
            },
            CoreEvent::Members {
                group: team(),
                members: Vec::new(),
            },
        ],
    );
    let screen = render(&state);
    assert!(screen.contains("team · not a member"), "{screen}");
    assert!(screen.contains("(not a member)"), "{screen}");
    assert!(!screen.contains("code 482 913"), "{screen}");
    insta::assert_snapshot!(screen);
}

#[test]
fn members_pane_hidden_when_toggled() {
    let mut state = session(80, 24);
    state.show_members = false;
    insta::assert_snapshot!(render(&state));
}

#[test]
fn help_screen_80x24() {
    let mut state = session(80, 24);
    state.mode = Mode::Help;
    insta::assert_snapshot!(render(&state));
}

#[test]
fn help_screen_40x12() {
    let mut state = session(40, 12);
    state.mode = Mode::Help;
    insta::assert_snapshot!(render(&state));
}

#[test]
fn search_results_with_their_dates() {
    let mut state = session(80, 24);
    let found = |id: i64, sender: &str, text: &str, at: i64| crate::core::db::HistoryEntry {
        id,
        seq: Some(id as u64),
        sender: sender.into(),
        kind: "message".into(),
        text: text.into(),
        at,
        state: None,
        outbox_id: None,
    };
    state.mode = Mode::Search {
        text: "deploy".into(),
        results: vec![
            found(4, "bob", "the deploy is at nine", EVENING),
            found(
                9,
                "alice",
                "deploy done,\nall green; a long line that the box cuts off at its right edge",
                NEXT_MORNING,
            ),
        ],
    };
    insta::assert_snapshot!(render(&state));
}

#[test]
fn verify_dialog() {
    let mut state = session(80, 24);
    state.mode = Mode::Verify {
        user: "bob".into(),
        theirs: "27182 81828 45904 52353 60287 47135".into(),
    };
    insta::assert_snapshot!(render(&state));
}

#[test]
fn scrolled_up_with_new_messages_below() {
    let mut state = session(80, 24);
    if let Some(group) = state.groups.first_mut() {
        group.scroll = 4;
    }
    feed(
        &mut state,
        vec![message(
            "bob",
            "a message that arrived while reading",
            7,
            NEXT_MORNING + 240,
        )],
    );
    insta::assert_snapshot!(render(&state));
}

#[test]
fn first_run_name_prompt() {
    let mut state = State::new(Settings::default(), (60, 14), 0, EVENING);
    state.mode = Mode::NamePrompt;
    state.composer.insert("ali");
    insta::assert_snapshot!(render(&state));
}

#[test]
fn too_small_terminal_says_so() {
    let state = session(30, 8);
    let screen = render(&state);
    assert!(screen.contains("needs at least"), "{screen}");
}

/// With more groups than rows, the pane lists the ones around the current group, says which in
/// its bottom border, and a shortened namesake keeps the start of its id.
#[test]
fn a_long_groups_list_shows_the_current_group_and_its_range() {
    let mut state = State::new(Settings::default(), (80, 24), 0, EVENING);
    let mut events = vec![CoreEvent::Ready {
        name: "alice".into(),
        fingerprint: "31415 92653".into(),
    }];
    for byte in 0..30u8 {
        events.push(CoreEvent::GroupCreated {
            group: GroupRef {
                id: GroupId::new(vec![byte + 1; 16]).expect("valid id"),
                name: format!("group{byte}"),
            },
        });
    }
    for byte in [0xe1, 0xe2] {
        events.push(CoreEvent::GroupCreated {
            group: GroupRef {
                id: GroupId::new(vec![byte; 16]).expect("valid id"),
                name: "a-rather-long-name".into(),
            },
        });
    }
    feed(&mut state, events);
    update(&mut state, Msg::Paste("/switch e2e2".into()));
    update(
        &mut state,
        Msg::Key(crossterm::event::KeyEvent::new(
            crossterm::event::KeyCode::Enter,
            crossterm::event::KeyModifiers::NONE,
        )),
    );
    let screen = render(&state);
    let pane: Vec<&str> = screen
        .lines()
        .map(|line| line.split('│').nth(1).unwrap_or_default())
        .collect();
    let listed = pane.join("\n");
    assert!(
        !listed.contains("group0 "),
        "scrolled past the first groups:\n{screen}"
    );
    assert!(listed.contains("group29"), "{screen}");
    // 32 groups, 18 rows, the last one current.
    assert!(screen.contains(" 15-32/32 "), "{screen}");
    assert!(
        listed.contains("(e1e1)") && listed.contains("(e2e2)"),
        "{screen}"
    );
}

/// Reading history while messages arrive: the lines on screen stay where they were (only the
/// "new below" notice takes the bottom row), instead of the view sliding down a line for each
/// line that arrived.
#[test]
fn a_scrolled_view_stays_on_its_lines_as_messages_arrive() {
    let mut state = session(80, 24);
    let backlog = (0..40)
        .map(|n| message("bob", &format!("backlog {n}"), 100 + n, NEXT_MORNING + 300))
        .collect();
    feed(&mut state, backlog);
    if let Some(group) = state.groups.first_mut() {
        group.scroll = 10;
    }
    let rows = |screen: &str| -> Vec<String> {
        // The timeline's rows but its bottom one, which the notice may take.
        screen
            .lines()
            .skip(1)
            .take(17)
            .map(str::to_string)
            .collect()
    };
    let before = rows(&render(&state));
    feed(
        &mut state,
        vec![
            message("carol", "short", 200, NEXT_MORNING + 360),
            message(
                "carol",
                &"wrapping words ".repeat(12),
                201,
                NEXT_MORNING + 360,
            ),
        ],
    );
    let after = render(&state);
    assert_eq!(rows(&after), before, "{after}");
    assert!(after.contains("2 new below"), "{after}");
}
