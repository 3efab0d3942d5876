//! Slash commands, parsed the same way for the TUI and the headless mode.

use mlschat_ds::protocol::{GroupId, UserName};

/// One line typed by the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlashCommand {
    Create(String),
    Invite(Vec<UserName>),
    Kick(UserName),
    Leave,
    Rename(String),
    Switch(String),
    Members,
    Update,
    Fingerprint(Option<UserName>),
    Verify(UserName),
    Status,
    Search(String),
    Help,
    Quit,
    /// Not a command: text for the current group.
    Message(String),
}

/// The command names, for help and completion.
pub const COMMANDS: &[(&str, &str)] = &[
    ("/create NAME", "create a group and switch to it"),
    ("/invite USER...", "add users to the current group"),
    ("/kick USER", "remove a user from the current group"),
    ("/leave", "leave the current group"),
    ("/rename NAME", "rename the current group for everyone"),
    ("/switch NAME", "make another group the current one"),
    ("/members", "list members with fingerprints"),
    (
        "/update",
        "refresh your keys in the current group (post-compromise security)",
    ),
    ("/fingerprint [USER]", "show your fingerprint or a member's"),
    ("/verify USER", "mark a user's fingerprint as verified"),
    (
        "/status",
        "ciphersuite, epoch and verification code of the current group",
    ),
    ("/search TEXT", "search the current group's history"),
    ("/help", "this list"),
    ("/quit", "send what is queued and exit"),
];

/// The positions in `groups` (id, name) of the groups `/switch wanted` means, in the order the
/// TUI and the headless mode both resolve it: a whole id first (it may also be the start of a
/// longer one), then the groups named `wanted`, and only if none is, the ids that start with it.
pub fn groups_meant<'a>(
    groups: impl Iterator<Item = (&'a GroupId, &'a str)> + Clone,
    wanted: &str,
) -> Vec<usize> {
    let positions = |matches: &dyn Fn(&GroupId, &str) -> bool| -> Vec<usize> {
        groups
            .clone()
            .enumerate()
            .filter(|(_, (id, name))| matches(id, name))
            .map(|(index, _)| index)
            .collect()
    };
    let whole = positions(&|id, _| id.to_hex() == wanted);
    if let [index, ..] = whole.as_slice() {
        return vec![*index];
    }
    let named = positions(&|_, name| name == wanted);
    if !named.is_empty() {
        return named;
    }
    positions(&|id, _| id.to_hex().starts_with(wanted))
}

fn user(word: &str) -> Result<UserName, String> {
    UserName::new(word).map_err(|error| format!("{word:?}: {error}"))
}

/// Parses one line. Lines not starting with `/` are messages; `//` escapes a leading slash.
pub fn parse(line: &str) -> Result<SlashCommand, String> {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(SlashCommand::Message(format!("/{rest}")));
    }
    let Some(command_line) = line.strip_prefix('/') else {
        return Ok(SlashCommand::Message(line.to_string()));
    };
    let (command, argument) = match command_line.split_once(char::is_whitespace) {
        Some((command, argument)) => (command, argument.trim()),
        None => (command_line, ""),
    };
    let words: Vec<&str> = argument.split_whitespace().collect();
    let one_user = |usage: &str| match words.as_slice() {
        [word] => user(word),
        _ => Err(format!("usage: {usage}")),
    };
    // A command that takes nothing refuses what it was given: `/leave now` or `/quit soon`
    // may be a message typed without its first character, and leaving (or quitting) on it
    // would be a surprise.
    let bare = |command: SlashCommand, usage: &str| {
        if words.is_empty() {
            Ok(command)
        } else {
            Err(format!("usage: {usage} (it takes no arguments)"))
        }
    };
    match command {
        "create" if !argument.is_empty() => Ok(SlashCommand::Create(argument.to_string())),
        "create" => Err("usage: /create NAME".into()),
        "invite" if !words.is_empty() => words
            .iter()
            .map(|word| user(word))
            .collect::<Result<_, _>>()
            .map(SlashCommand::Invite),
        "invite" => Err("usage: /invite USER...".into()),
        "kick" => one_user("/kick USER").map(SlashCommand::Kick),
        "leave" => bare(SlashCommand::Leave, "/leave"),
        "rename" if !argument.is_empty() => Ok(SlashCommand::Rename(argument.to_string())),
        "rename" => Err("usage: /rename NAME".into()),
        "switch" if !argument.is_empty() => Ok(SlashCommand::Switch(argument.to_string())),
        "switch" => Err("usage: /switch NAME".into()),
        "members" => bare(SlashCommand::Members, "/members"),
        "update" => bare(SlashCommand::Update, "/update"),
        "fingerprint" => match words.as_slice() {
            [] => Ok(SlashCommand::Fingerprint(None)),
            [word] => user(word).map(|user| SlashCommand::Fingerprint(Some(user))),
            _ => Err("usage: /fingerprint [USER]".into()),
        },
        "verify" => one_user("/verify USER").map(SlashCommand::Verify),
        "status" => bare(SlashCommand::Status, "/status"),
        "search" if !argument.is_empty() => Ok(SlashCommand::Search(argument.to_string())),
        "search" => Err("usage: /search TEXT".into()),
        "help" => bare(SlashCommand::Help, "/help"),
        "quit" => bare(SlashCommand::Quit, "/quit"),
        "exit" => bare(SlashCommand::Quit, "/exit"),
        other => Err(format!(
            "unknown command /{other}; /help lists the commands"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(text: &str) -> UserName {
        UserName::new(text).expect("valid name")
    }

    #[test]
    fn switch_takes_a_whole_id_then_a_name_then_the_start_of_an_id() {
        let id = |bytes: &[u8]| GroupId::new(bytes.to_vec()).expect("a group id");
        let groups = [
            (id(&[0xab, 0xcd]), "ops"),
            (id(&[0xab, 0xcd, 0x01]), "ops"),
            (id(&[0xef, 0x01]), "abcd0"),
        ];
        let meant = |wanted: &str| groups_meant(groups.iter().map(|(id, n)| (id, *n)), wanted);
        assert_eq!(meant("abcd"), [0], "a whole id, though it starts another");
        assert_eq!(meant("ops"), [0, 1], "namesakes");
        assert_eq!(meant("abcd0"), [2], "a name before the start of an id");
        assert_eq!(meant("abc"), [0, 1], "the start of two ids");
        assert_eq!(meant("ef"), [2]);
        assert!(meant("zz").is_empty());
    }

    #[test]
    fn commands_and_messages() {
        assert_eq!(parse("hello"), Ok(SlashCommand::Message("hello".into())));
        assert_eq!(
            parse("//not a command"),
            Ok(SlashCommand::Message("/not a command".into()))
        );
        assert_eq!(
            parse("/create team chat"),
            Ok(SlashCommand::Create("team chat".into()))
        );
        assert_eq!(
            parse("/invite bob carol"),
            Ok(SlashCommand::Invite(vec![name("bob"), name("carol")]))
        );
        assert_eq!(parse("/kick bob"), Ok(SlashCommand::Kick(name("bob"))));
        assert_eq!(
            parse("/rename the crew"),
            Ok(SlashCommand::Rename("the crew".into()))
        );
        assert_eq!(parse("/fingerprint"), Ok(SlashCommand::Fingerprint(None)));
        assert_eq!(parse("/quit"), Ok(SlashCommand::Quit));
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(
            parse("/frobnicate")
                .expect_err("unknown")
                .contains("unknown command")
        );
        assert!(parse("/kick").expect_err("usage").contains("usage"));
        assert!(
            parse("/kick bob carol")
                .expect_err("usage")
                .contains("usage")
        );
        assert!(parse("/invite Bob").expect_err("bad name").contains("Bob"));
        assert!(parse("/create").is_err());
        assert!(parse("/rename").expect_err("usage").contains("usage"));
        for command in [
            "leave", "members", "update", "status", "help", "quit", "exit",
        ] {
            assert_eq!(
                parse(&format!("/{command} now")),
                Err(format!("usage: /{command} (it takes no arguments)")),
            );
            assert!(parse(&format!("/{command}  ")).is_ok(), "{command}");
        }
    }
}
