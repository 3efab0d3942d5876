//! Tests of the pure update function: keys and core events in, state and effects out.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers, MouseButton, MouseEvent, MouseEventKind};
use mlschat_ds::protocol::{GroupId, UserName};

use super::*;
use crate::core::{CoreEvent, GroupRef, ListedGroup, MemberInfo};

fn named(name: &str, id: &[u8]) -> GroupRef {
    GroupRef {
        id: GroupId::new(id.to_vec()).expect("valid id"),
        name: name.into(),
    }
}

fn group(name: &str, byte: u8) -> GroupRef {
    named(name, &[byte; 16])
}

fn member(name: &str) -> MemberInfo {
    MemberInfo {
        name: name.to_string(),
        fingerprint: "12345 67890".into(),
        verified: false,
        key_changed: false,
    }
}

fn state() -> State {
    let mut state = State::new(Settings::default(), (80, 24), 0, 1_764_400_000);
    update(
        &mut state,
        Msg::Core(CoreEvent::Ready {
            name: "alice".into(),
            fingerprint: "11111 22222".into(),
        }),
    );
    state
}

fn key(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::NONE))
}

fn ctrl(c: char) -> Msg {
    Msg::Key(KeyEvent::new(KeyCode::Char(c), KeyModifiers::CONTROL))
}

fn alt(code: KeyCode) -> Msg {
    Msg::Key(KeyEvent::new(code, KeyModifiers::ALT))
}

fn type_text(state: &mut State, text: &str) {
    for c in text.chars() {
        update(state, key(KeyCode::Char(c)));
    }
}

fn with_group(state: &mut State, name: &str, byte: u8) -> GroupRef {
    let group = group(name, byte);
    update(
        state,
        Msg::Core(CoreEvent::GroupCreated {
            group: group.clone(),
        }),
    );
    group
}

fn message(group: &GroupRef, from: &str, text: &str, seq: u64) -> Msg {
    Msg::Core(CoreEvent::Message {
        group: group.clone(),
        from: from.into(),
        text: text.into(),
        seq,
        at: 1_764_400_000,
    })
}

/// The core's start-up listing of one group, as after a restart.
fn listed(state: &mut State, group: &GroupRef, active: bool, epoch: (u64, &str)) {
    update(
        state,
        Msg::Core(CoreEvent::Groups {
            groups: vec![ListedGroup {
                group: group.clone(),
                active,
                epoch: Some((epoch.0, epoch.1.into())),
                unread: 0,
                mentioned: false,
                viewed_at: 0,
            }],
        }),
    );
}

/// The system lines of the group at `index`, with whether each is a warning.
fn system_lines(state: &State, index: usize) -> Vec<(&str, bool)> {
    state.groups[index]
        .entries
        .iter()
        .filter_map(|entry| match &entry.kind {
            EntryKind::System { text, warning } => Some((text.as_str(), *warning)),
            _ => None,
        })
        .collect()
}

#[test]
fn enter_sends_to_the_current_group_and_clears_the_composer() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    type_text(&mut state, "hello");
    let effects = update(&mut state, key(KeyCode::Enter));
    assert_eq!(
        effects,
        vec![Effect::Core(Command::Send {
            group: team.id,
            text: "hello".into()
        })]
    );
    assert!(state.composer.is_empty());
    assert_eq!(state.input_history, vec!["hello".to_string()]);
}

#[test]
fn newline_keys_and_pastes_never_send() {
    let mut state = state();
    with_group(&mut state, "team", 1);
    type_text(&mut state, "one");
    assert!(update(&mut state, alt(KeyCode::Enter)).is_empty());
    type_text(&mut state, "two");
    assert!(update(&mut state, ctrl('j')).is_empty());
    assert!(update(&mut state, Msg::Paste("three\nfour\n".into())).is_empty());
    assert_eq!(state.composer.text(), "one\ntwo\nthree\nfour\n");
}

#[test]
fn unknown_commands_and_missing_groups_explain_themselves() {
    let mut state = state();
    type_text(&mut state, "/frobnicate");
    assert!(update(&mut state, key(KeyCode::Enter)).is_empty());
    assert!(
        matches!(&state.status, Some((text, Severity::Error)) if text.contains("unknown command"))
    );
    type_text(&mut state, "hello");
    assert!(update(&mut state, key(KeyCode::Enter)).is_empty());
    assert!(
        matches!(&state.status, Some((text, Severity::Error)) if text.contains("no current group"))
    );
    type_text(&mut state, "/kick");
    assert!(update(&mut state, key(KeyCode::Enter)).is_empty());
    assert!(matches!(&state.status, Some((text, _)) if text.contains("usage")));
}

#[test]
fn created_group_becomes_current_but_a_join_does_not_steal_focus() {
    let mut state = state();
    type_text(&mut state, "/create team");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::Core(Command::CreateGroup {
            id: None,
            name: "team".into()
        })]
    );
    let team = with_group(&mut state, "team", 1);
    assert_eq!(state.current_group().map(|view| &view.id), Some(&team.id));
    let other = group("other", 2);
    update(
        &mut state,
        Msg::Core(CoreEvent::Joined {
            group: other.clone(),
            by: "bob".into(),
        }),
    );
    assert_eq!(state.current_group().map(|view| &view.id), Some(&team.id));
    assert_eq!(state.groups[1].unread, 1);
}

#[test]
fn first_joined_group_becomes_current() {
    let mut state = state();
    let team = group("team", 1);
    let effects = update(
        &mut state,
        Msg::Core(CoreEvent::Joined {
            group: team.clone(),
            by: "bob".into(),
        }),
    );
    assert_eq!(state.current_group().map(|view| &view.id), Some(&team.id));
    assert!(effects.contains(&Effect::Core(Command::History {
        group: team.id.clone(),
        limit: HISTORY_PAGE
    })));
}

#[test]
fn unread_counts_mentions_and_the_bell() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let other = with_group(&mut state, "other", 2);
    update(
        &mut state,
        Msg::Core(CoreEvent::GroupCreated {
            group: team.clone(),
        }),
    );
    state.current = Some(0);
    assert!(update(&mut state, message(&other, "bob", "unrelated", 1)).is_empty());
    let effects = update(&mut state, message(&other, "bob", "hey @alice, look", 2));
    assert_eq!(effects, vec![Effect::Bell]);
    assert_eq!(state.groups[1].unread, 2);
    assert!(state.groups[1].mentioned);
    // More mentions within the same second (a catch-up after a restart) ring no more; a
    // mention a second later rings again.
    for seq in 10..15 {
        assert!(update(&mut state, message(&other, "bob", "@alice again", seq)).is_empty());
    }
    let later = state.now + 1;
    update(&mut state, Msg::Tick(later));
    let effects = update(&mut state, message(&other, "bob", "@alice later", 15));
    assert_eq!(effects, vec![Effect::Bell]);
    assert_eq!(state.groups[1].unread, 8);
    // "alicey" is not a mention of alice.
    assert!(update(&mut state, message(&team, "bob", "alicey", 3)).is_empty());
    update(&mut state, ctrl('n'));
    assert_eq!(state.current, Some(1));
    assert_eq!(state.groups[1].unread, 0);
    assert!(!state.groups[1].mentioned);
}

#[test]
fn own_messages_go_from_sending_to_sent_or_failed() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    update(
        &mut state,
        Msg::Core(CoreEvent::Queued {
            group: team.clone(),
            local_id: 7,
            text: "one".into(),
        }),
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Queued {
            group: team.clone(),
            local_id: 8,
            text: "two".into(),
        }),
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Sent {
            group: team.clone(),
            local_id: 7,
            seq: 4,
        }),
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Failed {
            group: team.clone(),
            local_id: 8,
            reason: "not a member".into(),
        }),
    );
    let deliveries: Vec<&Delivery> = state.groups[0]
        .entries
        .iter()
        .filter_map(|entry| match &entry.kind {
            EntryKind::Message { delivery, .. } => Some(delivery),
            EntryKind::System { .. } => None,
        })
        .collect();
    assert_eq!(
        deliveries,
        vec![&Delivery::Sent, &Delivery::Failed("not a member".into())]
    );
    assert_eq!(
        state.groups[0].entries.iter().find_map(|entry| entry.seq),
        Some(4)
    );
}

#[test]
fn reading_history_is_not_yanked_down_by_new_messages() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    for seq in 0..100 {
        update(
            &mut state,
            message(&team, "bob", &format!("line {seq}"), seq),
        );
    }
    update(&mut state, key(KeyCode::PageUp));
    let scrolled = state.groups[0].scroll;
    assert!(scrolled > 0);
    // `scroll` counts lines up from the bottom: the view stays on the same lines only if it
    // grows by what arrives below (one line per short message here).
    update(&mut state, message(&team, "bob", "new", 100));
    update(&mut state, message(&team, "bob", "newer", 101));
    assert_eq!(state.groups[0].scroll, scrolled + 2);
    assert_eq!(state.groups[0].new_below, 2);
    // A message that wraps moves it by every line it takes.
    let long = "word ".repeat(40);
    update(&mut state, message(&team, "bob", &long, 102));
    let wrapped = crate::ui::timeline::entry_height(
        &state.groups[0],
        state.groups[0].entries.len() - 1,
        crate::ui::timeline_width(&state),
        state.utc_offset,
    );
    assert!(wrapped > 1);
    assert_eq!(state.groups[0].scroll, scrolled + 2 + wrapped);
    for _ in 0..3 {
        update(&mut state, key(KeyCode::PageDown));
    }
    assert_eq!(state.groups[0].scroll, 0);
    assert_eq!(state.groups[0].new_below, 0);
    // Scrolling is bounded by the content.
    for _ in 0..100 {
        update(&mut state, key(KeyCode::PageUp));
    }
    let top = state.groups[0].scroll;
    update(&mut state, key(KeyCode::PageUp));
    assert_eq!(state.groups[0].scroll, top);
}

#[test]
fn group_switching_keys() {
    let mut state = state();
    with_group(&mut state, "one", 1);
    with_group(&mut state, "two", 2);
    with_group(&mut state, "three", 3);
    state.current = Some(0);
    update(&mut state, alt(KeyCode::Down));
    assert_eq!(state.current, Some(1));
    update(&mut state, ctrl('p'));
    update(&mut state, ctrl('p'));
    assert_eq!(state.current, Some(2));
    update(&mut state, alt(KeyCode::Char('1')));
    assert_eq!(state.current, Some(0));
    update(&mut state, alt(KeyCode::Char('9')));
    assert_eq!(state.current, Some(0));
    type_text(&mut state, "/switch two");
    update(&mut state, key(KeyCode::Enter));
    assert_eq!(state.current, Some(1));
}

fn shown_names(state: &State) -> Vec<String> {
    state
        .groups
        .iter()
        .map(|group| state.shown_name(group))
        .collect()
}

/// Groups that share a name are told apart by the start of their ids, which `/switch` takes.
#[test]
fn namesake_groups_show_and_take_the_start_of_their_ids() {
    let mut state = state();
    let first = named("ops", &[&[0xab, 0xcd, 0x01, 0x00][..], &[0; 12]].concat());
    let second = named("ops", &[&[0xab, 0xcd, 0x02][..], &[0; 13]].concat());
    // Another name whose id shares more with the first: the shown start must not match it.
    let third = named("dev", &[&[0xab, 0xcd, 0x01, 0xff][..], &[0; 12]].concat());
    for group in [&first, &second, &third] {
        update(
            &mut state,
            Msg::Core(CoreEvent::GroupCreated {
                group: group.clone(),
            }),
        );
    }
    assert_eq!(
        shown_names(&state),
        ["ops (abcd010)", "ops (abcd02)", "dev"]
    );

    type_text(&mut state, "/switch ops");
    update(&mut state, key(KeyCode::Enter));
    assert!(
        matches!(&state.status, Some((text, Severity::Error))
            if text == "several groups match ops: /switch abcd010 or /switch abcd02"),
        "{:?}",
        state.status
    );

    // Tab offers what /switch takes: the starts of the namesakes' ids, a unique name whole.
    type_text(&mut state, "/switch op");
    update(&mut state, key(KeyCode::Tab));
    assert_eq!(state.composer.text(), "/switch op");
    assert!(
        matches!(&state.status, Some((text, _)) if text == "abcd010  abcd02"),
        "{:?}",
        state.status
    );
    update(&mut state, ctrl('u'));
    type_text(&mut state, "/switch de");
    update(&mut state, key(KeyCode::Tab));
    assert_eq!(state.composer.text(), "/switch dev ");
    update(&mut state, ctrl('u'));

    type_text(&mut state, "/switch abcd02");
    update(&mut state, key(KeyCode::Enter));
    assert_eq!(
        state.current_group().map(|group| &group.id),
        Some(&second.id)
    );

    // Once the name is unique again, it shows alone.
    update(
        &mut state,
        Msg::Core(CoreEvent::GroupRenamed {
            group: named("ops two", second.id.as_bytes()),
            by: Some("bob".into()),
        }),
    );
    assert_eq!(shown_names(&state), ["ops", "ops two", "dev"]);
}

/// Ids come from the DS and other members: short ones, ids that start other ids, and names
/// that look like the start of an id still give a start `/switch` takes, and never a panic.
#[test]
fn the_start_of_an_id_works_for_any_ids_and_names() {
    let mut state = state();
    let short = named("ops", &[0x07]);
    let beef = named("ops", &[&[0xbe, 0xef, 0x12][..], &[0; 13]].concat());
    let named_beef = named("beef", &[0x55; 16]);
    let whole = named("dup", &[0x01; 16]);
    let longer = named("dup", &[0x01; 17]);
    for group in [&short, &beef, &named_beef, &whole, &longer] {
        update(
            &mut state,
            Msg::Core(CoreEvent::Joined {
                group: group.clone(),
                by: "mallory".into(),
            }),
        );
    }
    let shown = shown_names(&state);
    assert_eq!(shown[0], "ops (07)", "{shown:?}");
    assert_eq!(shown[1], "ops (beef1)", "{shown:?}");
    assert_eq!(shown[3], format!("dup ({})", "01".repeat(16)), "{shown:?}");
    assert_eq!(shown[4], format!("dup ({}0)", "01".repeat(16)), "{shown:?}");
    for (group, typed) in [
        (&short, "07".to_string()),
        (&beef, "beef1".to_string()),
        (&named_beef, "beef".to_string()),
        (&whole, "01".repeat(16)),
        (&longer, "01".repeat(17)),
    ] {
        type_text(&mut state, &format!("/switch {typed}"));
        update(&mut state, key(KeyCode::Enter));
        assert_eq!(
            state.current_group().map(|view| &view.id),
            Some(&group.id),
            "/switch {typed}: {:?}",
            state.status
        );
    }
}

fn click(column: u16, row: u16) -> Msg {
    Msg::Mouse(MouseEvent {
        kind: MouseEventKind::Down(MouseButton::Left),
        column,
        row,
        modifiers: KeyModifiers::NONE,
    })
}

/// The groups pane scrolls to keep the current group in sight, and a click on a listed group
/// switches to it.
#[test]
fn the_groups_pane_follows_the_current_group_and_clicks_switch() {
    let mut state = state();
    for byte in 0..30u8 {
        with_group(&mut state, &format!("group{byte}"), byte + 1);
    }
    let list = crate::ui::groups_list_area(&state);
    assert_eq!(list.height, 18, "80x24: 18 rows of groups");
    update(&mut state, alt(KeyCode::Char('1')));
    assert_eq!(state.current, Some(0));
    assert_eq!(crate::ui::groups_first_shown(&state), 0);

    // The third row lists the third group.
    update(&mut state, click(list.x + 2, list.y + 2));
    assert_eq!(state.current, Some(2));
    // Below the last group, on the border, or in the timeline: nothing happens.
    update(&mut state, click(list.x, list.y + list.height));
    update(&mut state, click(list.x + list.width + 5, list.y + 1));
    assert_eq!(state.current, Some(2));

    // The 26th group is current: the list moves so that it shows on the last row, and the
    // rows are clicked as shown.
    type_text(&mut state, "/switch group25");
    update(&mut state, key(KeyCode::Enter));
    assert_eq!(state.current, Some(25));
    assert_eq!(crate::ui::groups_first_shown(&state), 25 + 1 - 18);
    // A click does not move the list under the pointer; going above it does.
    update(&mut state, click(list.x + 1, list.y));
    assert_eq!(state.current, Some(8));
    assert_eq!(crate::ui::groups_first_shown(&state), 8);
    update(&mut state, alt(KeyCode::Char('3')));
    assert_eq!(state.current, Some(2));
    assert_eq!(crate::ui::groups_first_shown(&state), 2);
}

#[test]
fn tab_completes_commands_and_member_names() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    update(
        &mut state,
        Msg::Core(CoreEvent::Members {
            group: team,
            members: vec![member("alice"), member("bob"), member("bella")],
        }),
    );
    type_text(&mut state, "/inv");
    update(&mut state, key(KeyCode::Tab));
    assert_eq!(state.composer.text(), "/invite ");
    state.composer.take();
    type_text(&mut state, "bo");
    update(&mut state, key(KeyCode::Tab));
    assert_eq!(state.composer.text(), "bob: ");
    state.composer.take();
    type_text(&mut state, "hi @b");
    update(&mut state, key(KeyCode::Tab));
    assert!(
        matches!(&state.status, Some((text, _)) if text.contains("@bob") && text.contains("@bella"))
    );
}

#[test]
fn verify_shows_both_fingerprints_then_marks_after_confirmation() {
    let mut state = state();
    type_text(&mut state, "/verify bob");
    let bob = UserName::new("bob").expect("name");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::Core(Command::Fingerprint {
            user: Some(bob.clone())
        })]
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Fingerprint {
            user: "bob".into(),
            fingerprint: "99999 88888".into(),
            verified: false,
            key_changed: false,
        }),
    );
    assert_eq!(
        state.mode,
        Mode::Verify {
            user: "bob".into(),
            theirs: "99999 88888".into()
        }
    );
    assert_eq!(
        update(&mut state, key(KeyCode::Char('y'))),
        vec![Effect::Core(Command::Verify { user: bob })]
    );
    assert_eq!(state.mode, Mode::Normal);
}

#[test]
fn input_history_with_up_and_down() {
    let mut state = state();
    with_group(&mut state, "team", 1);
    for text in ["first", "second"] {
        type_text(&mut state, text);
        update(&mut state, key(KeyCode::Enter));
    }
    update(&mut state, key(KeyCode::Up));
    assert_eq!(state.composer.text(), "second");
    update(&mut state, key(KeyCode::Up));
    assert_eq!(state.composer.text(), "first");
    update(&mut state, key(KeyCode::Down));
    assert_eq!(state.composer.text(), "second");
    update(&mut state, key(KeyCode::Down));
    assert_eq!(state.composer.text(), "");
}

#[test]
fn quitting_flushes_first_and_a_second_ctrl_c_leaves_at_once() {
    let mut state = state();
    assert_eq!(
        update(&mut state, ctrl('c')),
        vec![Effect::Core(Command::Quit)]
    );
    // The core is told to stop too: the exit waits for it, and it would otherwise still wait
    // for the outbox.
    assert_eq!(
        update(&mut state, ctrl('c')),
        vec![Effect::Core(Command::Quit), Effect::Exit]
    );
    let mut state = super::tests::state();
    assert_eq!(
        update(&mut state, Msg::Terminate),
        vec![Effect::Core(Command::Quit)]
    );
    assert_eq!(
        update(&mut state, Msg::Core(CoreEvent::Stopped)),
        vec![Effect::Exit]
    );
}

/// A restart opens on the group looked at last (not the newest), with the unread counts and
/// mentions the core kept; leaving a group, or quitting, marks it read up to what was shown.
#[test]
fn a_restart_opens_on_the_last_viewed_group_and_leaving_a_group_marks_it_read() {
    let mut state = state();
    let (old, viewed, newest) = (group("old", 1), group("viewed", 2), group("newest", 3));
    let listing = |group: &GroupRef, unread: usize, mentioned: bool, viewed_at: i64| ListedGroup {
        group: group.clone(),
        active: true,
        epoch: Some((1, "111 111".into())),
        unread,
        mentioned,
        viewed_at,
    };
    let effects = update(
        &mut state,
        Msg::Core(CoreEvent::Groups {
            groups: vec![
                listing(&old, 0, false, 1_764_000_000),
                listing(&viewed, 4, false, 1_764_300_000),
                listing(&newest, 2, true, 0),
            ],
        }),
    );
    assert_eq!(state.current, Some(1));
    assert!(
        !effects
            .iter()
            .any(|effect| matches!(effect, Effect::Core(Command::MarkRead { .. }))),
        "nothing was shown before"
    );
    let counts: Vec<(usize, bool)> = state
        .groups
        .iter()
        .map(|group| (group.unread, group.mentioned))
        .collect();
    assert_eq!(counts, [(0, false), (0, false), (2, true)]);

    update(&mut state, message(&viewed, "bob", "hi", 41));
    update(&mut state, message(&viewed, "bob", "there", 42));
    let effects = update(&mut state, alt(KeyCode::Down));
    assert_eq!(state.current, Some(2));
    assert_eq!(
        effects.first(),
        Some(&Effect::Core(Command::MarkRead {
            group: viewed.id.clone(),
            seq: 42,
        }))
    );
    update(&mut state, message(&newest, "carol", "yo", 7));
    assert_eq!(
        update(&mut state, ctrl('c')),
        vec![
            Effect::Core(Command::MarkRead {
                group: newest.id.clone(),
                seq: 7,
            }),
            Effect::Core(Command::Quit)
        ]
    );
}

/// While messages arrive in the group on screen, it is marked read every few seconds, so a
/// client that never quits properly loses little; without new messages nothing is sent.
#[test]
fn the_group_on_screen_is_marked_read_as_messages_arrive() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let start = state.now;
    assert_eq!(update(&mut state, Msg::Tick(start + 60)), Vec::new());
    update(&mut state, message(&team, "bob", "hi", 5));
    assert_eq!(
        update(&mut state, Msg::Tick(start + 61)),
        vec![Effect::Core(Command::MarkRead {
            group: team.id.clone(),
            seq: 5,
        })]
    );
    update(&mut state, message(&team, "bob", "again", 6));
    assert_eq!(
        update(&mut state, Msg::Tick(start + 62)),
        Vec::new(),
        "not more often than every READ_MARK_SECS"
    );
    state.groups[0].new_below = 1;
    assert_eq!(
        update(&mut state, Msg::Tick(start + 61 + super::READ_MARK_SECS)),
        Vec::new(),
        "not while the new message is below the view"
    );
    state.groups[0].new_below = 0;
    assert_eq!(
        update(&mut state, Msg::Tick(start + 61 + super::READ_MARK_SECS)),
        vec![Effect::Core(Command::MarkRead {
            group: team.id.clone(),
            seq: 6,
        })]
    );
    assert_eq!(
        update(&mut state, Msg::Tick(start + 200)),
        Vec::new(),
        "nothing new"
    );
}

#[test]
fn first_run_asks_for_a_name() {
    let mut state = State::new(Settings::default(), (80, 24), 0, 0);
    state.mode = Mode::NamePrompt;
    type_text(&mut state, "Bad Name");
    assert!(update(&mut state, key(KeyCode::Enter)).is_empty());
    assert!(state.status.is_some());
    type_text(&mut state, "carol");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::StartClient(UserName::new("carol").expect("name"))]
    );
    assert_eq!(state.mode, Mode::Normal);
}

#[test]
fn key_changes_are_flagged_loudly() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    update(
        &mut state,
        Msg::Core(CoreEvent::Members {
            group: team.clone(),
            members: vec![member("alice"), member("bob")],
        }),
    );
    let effects = update(
        &mut state,
        Msg::Core(CoreEvent::KeyChanged {
            user: "bob".into(),
            fingerprint: "55555".into(),
            group: None,
        }),
    );
    assert!(effects.contains(&Effect::Bell));
    assert!(effects.contains(&Effect::Core(Command::Members { group: team.id })));
    assert!(state.groups[0].entries.iter().any(|entry| matches!(&entry.kind, EntryKind::System { text, warning: true } if text.contains("bob's key changed"))));

    // Shown by a commit of a group whose member list does not list bob yet: that group gets
    // the line too.
    let ops = with_group(&mut state, "ops", 2);
    update(
        &mut state,
        Msg::Core(CoreEvent::KeyChanged {
            user: "bob".into(),
            fingerprint: "66666".into(),
            group: Some(ops),
        }),
    );
    assert!(
        system_lines(&state, 1)
            .iter()
            .any(|(text, warning)| *warning && text.contains("66666"))
    );
}

#[test]
fn resizing_clears_and_ticks_redraw_only_on_new_minutes() {
    let mut state = state();
    assert_eq!(update(&mut state, Msg::Resize(40, 12)), vec![Effect::Clear]);
    assert_eq!(state.size, (40, 12));
    state.dirty = false;
    state.now = 60 * 1000;
    update(&mut state, Msg::Tick(60 * 1000 + 5));
    assert!(!state.dirty);
    update(&mut state, Msg::Tick(60 * 1001));
    assert!(state.dirty);
}

#[test]
fn leaving_is_said_once_and_as_ones_own() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let before = system_lines(&state, 0).len();
    for event in [
        CoreEvent::MemberRemoved {
            group: team.clone(),
            user: "bob".into(),
            by: "bob".into(),
        },
        CoreEvent::MemberRemoved {
            group: team.clone(),
            user: "alice".into(),
            by: "alice".into(),
        },
        CoreEvent::Left {
            group: team,
            by: "alice".into(),
        },
    ] {
        update(&mut state, Msg::Core(event));
    }
    assert_eq!(
        system_lines(&state, 0)[before..],
        [("bob left", false), ("you left the group", true)]
    );
}

#[test]
fn information_fades_but_warnings_and_errors_stay() {
    let mut state = state();
    let start = state.now;
    state.info("no DS answered: hosting one here");
    update(&mut state, Msg::Tick(start + INFO_NOTICE_SECS - 1));
    assert!(state.status.is_some(), "shown for a while");
    update(&mut state, Msg::Tick(start + INFO_NOTICE_SECS));
    assert_eq!(state.status, None);
    assert!(state.dirty, "the hint is drawn again");

    state.fail("a message to team failed: refused");
    update(&mut state, Msg::Tick(start + 10 * INFO_NOTICE_SECS));
    assert!(
        matches!(state.status, Some((_, Severity::Error))),
        "an error waits to be seen"
    );
    update(&mut state, key(KeyCode::Esc));
    assert_eq!(state.status, None);
}

#[test]
fn a_restarted_client_shows_the_epoch_at_once_and_notes_the_next_one() {
    let mut state = state();
    let team = group("team", 1);
    listed(&mut state, &team, true, (4, "123 456"));
    assert_eq!(state.current, Some(0));
    assert_eq!(state.groups[0].epoch, Some(4));
    assert_eq!(state.groups[0].code.as_deref(), Some("123 456"));
    update(
        &mut state,
        Msg::Core(CoreEvent::EpochChanged {
            group: team,
            epoch: 5,
            code: "654 321".into(),
        }),
    );
    assert_eq!(
        system_lines(&state, 0),
        [("new epoch 5 · verification code 654 321", false)],
        "the first epoch change after a restart gets its line"
    );
}

#[test]
fn joining_again_shows_the_welcomes_epoch_once_and_not_as_a_change() {
    let mut state = state();
    let team = group("team", 1);
    listed(&mut state, &team, false, (7, "111 111"));
    let epoch = CoreEvent::EpochChanged {
        group: team.clone(),
        epoch: 12,
        code: "222 222".into(),
    };
    for event in [
        CoreEvent::Joined {
            group: team.clone(),
            by: "bob".into(),
        },
        epoch.clone(),
        epoch,
    ] {
        update(&mut state, Msg::Core(event));
    }
    assert_eq!(state.groups[0].epoch, Some(12));
    // The same lines as the core stores for a Welcome.
    assert_eq!(
        system_lines(&state, 0),
        [
            ("bob added you to the group", false),
            ("new epoch 12 · verification code 222 222", false)
        ]
    );
}

#[test]
fn a_rename_shows_who_renamed_the_group_and_learning_a_name_shows_nothing() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let renamed = |name: &str, by: Option<&str>| {
        Msg::Core(CoreEvent::GroupRenamed {
            group: GroupRef {
                id: team.id.clone(),
                name: name.into(),
            },
            by: by.map(String::from),
        })
    };
    update(&mut state, renamed("crew", Some("bob")));
    type_text(&mut state, "/rename crew two");
    update(&mut state, key(KeyCode::Enter));
    assert!(
        matches!(&state.status, Some((text, Severity::Info)) if text.contains("renaming")),
        "{:?}",
        state.status
    );
    update(&mut state, renamed("crew two", Some("alice")));
    assert_eq!(
        state.status, None,
        "the notice goes once the rename is done"
    );
    update(&mut state, renamed("learned", None));
    assert_eq!(state.groups[0].name, "learned");
    assert_eq!(
        system_lines(&state, 0),
        [
            ("you created team", false),
            ("bob renamed the group to crew", false),
            ("you renamed the group to crew two", false)
        ]
    );
    type_text(&mut state, "/rename  new name");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::Core(Command::Rename {
            group: team.id.clone(),
            name: "new name".into(),
        })]
    );
}

#[test]
fn an_overtaken_rename_gets_a_line_and_keeps_the_name() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let overtaken = |by: &str, name: &str| {
        Msg::Core(CoreEvent::RenameOvertaken {
            group: GroupRef {
                id: team.id.clone(),
                name: "crew".into(),
            },
            by: by.into(),
            name: name.into(),
        })
    };
    type_text(&mut state, "/rename mine");
    update(&mut state, key(KeyCode::Enter));
    update(&mut state, overtaken("bob", "theirs"));
    assert!(
        state.status.is_some(),
        "another member's rename says nothing of ours"
    );
    update(&mut state, overtaken("alice", "mine"));
    assert_eq!(
        state.status,
        Some((
            "the group is called crew: a rename came after yours to mine".into(),
            Severity::Info
        )),
        "our rename is done, and the notice says what became of it"
    );
    // The same name as the one that stands: a plain rename line.
    update(&mut state, overtaken("carol", "crew"));
    assert_eq!(state.groups[0].name, "crew");
    assert_eq!(
        system_lines(&state, 0),
        [
            ("you created team", false),
            (
                "bob renamed the group to theirs, before the rename to crew",
                false
            ),
            (
                "you renamed the group to mine, before the rename to crew",
                false
            ),
            ("carol renamed the group to crew", false)
        ]
    );
}

#[test]
fn stored_warnings_stay_warnings() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let stored = |id: i64, kind: &str, text: &str| HistoryEntry {
        id,
        seq: Some(id as u64),
        sender: String::new(),
        kind: kind.into(),
        text: text.into(),
        at: 1_764_400_000,
        state: None,
        outbox_id: None,
    };
    update(
        &mut state,
        Msg::Core(CoreEvent::History {
            group: team,
            entries: vec![
                stored(1, "system", "alice added bob"),
                stored(2, "warning", "WARNING: bob's key changed"),
            ],
        }),
    );
    assert_eq!(
        system_lines(&state, 0),
        [
            ("alice added bob", false),
            ("WARNING: bob's key changed", true)
        ]
    );
}

#[test]
fn queued_messages_from_before_a_restart_settle_when_sent() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let pending = HistoryEntry {
        id: 9,
        seq: None,
        sender: "alice".into(),
        kind: "message".into(),
        text: "typed while offline".into(),
        at: 1_764_400_000,
        state: Some("sending".into()),
        outbox_id: Some(5),
    };
    update(
        &mut state,
        Msg::Core(CoreEvent::History {
            group: team.clone(),
            entries: vec![pending],
        }),
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Sent {
            group: team,
            local_id: 5,
            seq: 12,
        }),
    );
    let entry = state.groups[0].entries.last().expect("the restored line");
    assert_eq!(entry.seq, Some(12));
    assert!(matches!(
        &entry.kind,
        EntryKind::Message {
            delivery: Delivery::Sent,
            own: true,
            ..
        }
    ));
}

#[test]
fn ten_thousand_messages_of_history_load_and_scroll() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let entries: Vec<HistoryEntry> = (0..10_000)
        .map(|index| HistoryEntry {
            id: index,
            seq: Some(index as u64 + 1),
            sender: if index % 2 == 0 {
                "bob".into()
            } else {
                "alice".into()
            },
            kind: "message".into(),
            text: format!("message number {index}"),
            at: 1_764_400_000 + index,
            state: None,
            outbox_id: None,
        })
        .collect();
    update(
        &mut state,
        Msg::Core(CoreEvent::History {
            group: team,
            entries,
        }),
    );
    assert_eq!(state.groups[0].entries.len(), 10_000);
    for _ in 0..3 {
        update(&mut state, key(KeyCode::PageUp));
    }
    let page = usize::from(crate::ui::timeline_height(&state)) - 2;
    assert_eq!(state.groups[0].scroll, 3 * page);
    let mut terminal =
        ratatui::Terminal::new(ratatui::backend::TestBackend::new(80, 24)).expect("terminal");
    terminal
        .draw(|frame| crate::ui::render(&state, frame))
        .expect("draw");
    let screen = terminal.backend().to_string();
    // The bottom row holds the "more below" indicator, so the newest line shown is one above.
    let newest_shown = 10_000 - 1 - 3 * page - 1;
    assert!(
        screen.contains(&format!("message number {newest_shown} ")),
        "{screen}"
    );
    assert!(
        !screen.contains(&format!("message number {} ", newest_shown + 1)),
        "{screen}"
    );
}

/// Below the last group, and on a screen too small to draw the panes, a click does nothing.
#[test]
fn clicks_off_the_listed_groups_do_nothing() {
    let mut state = state();
    with_group(&mut state, "one", 1);
    with_group(&mut state, "two", 2);
    update(&mut state, alt(KeyCode::Char('1')));
    let list = crate::ui::groups_list_area(&state);
    update(&mut state, click(list.x + 1, list.y + 2));
    assert_eq!(state.current, Some(0), "the third row lists no group");
    update(&mut state, Msg::Resize(30, 10));
    update(&mut state, click(list.x + 1, list.y + 1));
    assert_eq!(state.current, Some(0), "nothing is drawn but a notice");
    update(&mut state, Msg::Resize(80, 24));
    update(&mut state, click(list.x + 1, list.y + 1));
    assert_eq!(state.current, Some(1));
}

#[test]
fn a_requested_leave_says_so_until_it_is_done() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    let group = GroupRef {
        id: team.id.clone(),
        name: "team".into(),
    };
    type_text(&mut state, "/leave");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::Core(Command::Leave {
            group: team.id.clone(),
        })]
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::LeaveRequested {
            group: group.clone(),
        }),
    );
    assert!(
        matches!(&state.status, Some((text, Severity::Info)) if text.starts_with("leaving team")),
        "{:?}",
        state.status
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::Left {
            group,
            by: "alice".into(),
        }),
    );
    assert_eq!(state.status, None, "the notice goes once the leave is done");
    assert!(!state.groups[0].active);
}

#[test]
fn an_esc_that_arrives_joined_to_the_next_key_counts_as_both() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    type_text(&mut state, "/help");
    update(&mut state, key(KeyCode::Enter));
    assert_eq!(state.mode, Mode::Help);
    // Esc and '/' in one read, as the terminal's Alt+'/': the help closes, the '/' stays.
    update(&mut state, alt(KeyCode::Char('/')));
    assert_eq!(state.mode, Mode::Normal);
    type_text(&mut state, "kick bob");
    assert_eq!(
        update(&mut state, key(KeyCode::Enter)),
        vec![Effect::Core(Command::Kick {
            group: team.id.clone(),
            user: UserName::new("bob").expect("name"),
        })]
    );
    // A bound Alt key keeps its meaning.
    with_group(&mut state, "crew", 2);
    update(&mut state, alt(KeyCode::Char('2')));
    assert_eq!(state.current, Some(1));
}

#[test]
fn the_notice_of_a_join_takes_the_name_learned_after_it() {
    let mut state = state();
    with_group(&mut state, "team", 1);
    let placeholder = GroupRef {
        id: group("group-0202", 2).id,
        name: "group-0202".into(),
    };
    update(
        &mut state,
        Msg::Core(CoreEvent::Joined {
            group: placeholder.clone(),
            by: "bob".into(),
        }),
    );
    assert_eq!(
        state.status,
        Some(("bob added you to group-0202".into(), Severity::Info))
    );
    update(
        &mut state,
        Msg::Core(CoreEvent::GroupRenamed {
            group: GroupRef {
                id: placeholder.id.clone(),
                name: "ops".into(),
            },
            by: None,
        }),
    );
    assert_eq!(
        state.status,
        Some(("bob added you to ops".into(), Severity::Info))
    );
}

#[test]
fn added_again_to_the_group_on_screen_reloads_its_members() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    update(
        &mut state,
        Msg::Core(CoreEvent::Left {
            group: team.clone(),
            by: "bob".into(),
        }),
    );
    let effects = update(
        &mut state,
        Msg::Core(CoreEvent::Joined {
            group: team.clone(),
            by: "bob".into(),
        }),
    );
    assert!(state.groups[0].active);
    assert!(
        effects.contains(&Effect::Core(Command::Members {
            group: team.id.clone()
        })),
        "{effects:?}"
    );
}

#[test]
fn a_removal_that_expired_closes_the_group_and_says_why() {
    let mut state = state();
    let team = with_group(&mut state, "team", 1);
    update(
        &mut state,
        Msg::Core(CoreEvent::RemovalExpired {
            group: team.clone(),
        }),
    );
    assert!(!state.groups[0].active);
    let why = timeline::removal_missed();
    assert!(
        matches!(
            &state.groups[0].entries.last().map(|entry| &entry.kind),
            Some(EntryKind::System { text, warning: true }) if *text == why
        ),
        "{:?}",
        state.groups[0].entries
    );
    assert_eq!(
        state.status,
        Some((format!("team: {why}"), Severity::Warning))
    );
}
