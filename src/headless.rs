//! `--headless`: one command per line on stdin, one JSON object per line on stdout, nothing
//! else on stdout. The event names and fields are a contract (see docs/headless.md).

use std::collections::HashMap;

use mlschat_ds::protocol::GroupId;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::Client;
use crate::commands::{self, COMMANDS, SlashCommand};
use crate::core::{Command, CoreEvent, CoreInput, GroupRef, MemberInfo};
use crate::signals::{QuitSignal, QuitSignals};

/// The headless session's view: which groups exist and which one is current.
#[derive(Debug, Default)]
pub struct Session {
    pub current: Option<GroupId>,
    pub names: HashMap<GroupId, String>,
    pub active: HashMap<GroupId, bool>,
    /// The current group as last recorded in the profile (as the group looked at last), so
    /// that the next start picks it again.
    recorded: Option<GroupId>,
}

impl Session {
    /// The current group, if it changed since it was last recorded and the core knows it
    /// (a `/create`d group only once its `group_created` came). The caller records it with
    /// `Command::MarkRead`.
    pub fn current_to_record(&mut self) -> Option<GroupId> {
        let current = self.current.clone()?;
        if self.recorded.as_ref() == Some(&current) || !self.active.contains_key(&current) {
            return None;
        }
        self.recorded = Some(current.clone());
        Some(current)
    }

    fn remember(&mut self, group: &GroupRef) {
        self.names.insert(group.id.clone(), group.name.clone());
    }

    /// Finds a group by display name (or by a prefix of its hex id).
    pub fn find(&self, name: &str) -> Result<GroupId, String> {
        let groups: Vec<(&GroupId, &str)> = self
            .names
            .iter()
            .map(|(id, name)| (id, name.as_str()))
            .collect();
        let matches: Vec<&GroupId> = crate::commands::groups_meant(groups.iter().copied(), name)
            .into_iter()
            .filter_map(|index| groups.get(index).map(|(id, _)| *id))
            .collect();
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(format!("no group named {name}")),
            _ => {
                let mut ids: Vec<String> = matches.iter().map(|id| id.to_hex()).collect();
                ids.sort();
                Err(format!(
                    "several groups match {name}; use the start of one of their ids: {}",
                    ids.join(", ")
                ))
            }
        }
    }

    fn current(&self) -> Result<GroupId, String> {
        self.current
            .clone()
            .ok_or_else(|| "no current group: /create one or /switch to one".to_string())
    }

    /// Turns a typed line into a core command (or an immediate answer).
    pub fn interpret(&mut self, line: &str) -> Result<Reaction, String> {
        let command = commands::parse(line)?;
        Ok(match command {
            SlashCommand::Create(name) => {
                // The group is current from this line on, not from its `group_created`: a
                // script that goes on with `/invite` or a message without waiting must not
                // reach the group that was current before. So the id is picked here.
                let name = crate::core::valid_group_name(&name)?;
                let raw_id: [u8; 16] = rand::random();
                let id = GroupId::new(raw_id.to_vec()).map_err(|error| error.to_string())?;
                self.names.insert(id.clone(), name.clone());
                self.current = Some(id);
                Reaction::Core(Command::CreateGroup {
                    name,
                    id: Some(raw_id),
                })
            }
            SlashCommand::Invite(users) => Reaction::Core(Command::Invite {
                group: self.current()?,
                users,
            }),
            SlashCommand::Kick(user) => Reaction::Core(Command::Kick {
                group: self.current()?,
                user,
            }),
            SlashCommand::Leave => Reaction::Core(Command::Leave {
                group: self.current()?,
            }),
            SlashCommand::Rename(name) => Reaction::Core(Command::Rename {
                group: self.current()?,
                name,
            }),
            SlashCommand::Switch(name) => {
                let group = self.find(&name)?;
                self.current = Some(group.clone());
                Reaction::Print(
                    json!({"event": "switched", "group": self.names.get(&group), "group_id": group.to_hex()}),
                )
            }
            SlashCommand::Members => Reaction::Core(Command::Members {
                group: self.current()?,
            }),
            SlashCommand::Update => Reaction::Core(Command::Update {
                group: self.current()?,
            }),
            SlashCommand::Fingerprint(user) => Reaction::Core(Command::Fingerprint { user }),
            SlashCommand::Verify(user) => Reaction::Core(Command::Verify { user }),
            SlashCommand::Status => Reaction::Core(Command::Status {
                group: self.current()?,
            }),
            SlashCommand::Search(text) => Reaction::Core(Command::Search {
                group: self.current()?,
                text,
            }),
            SlashCommand::Help => Reaction::Print(json!({
                "event": "help",
                "commands": COMMANDS.iter().map(|(usage, what)| json!({"usage": usage, "description": what})).collect::<Vec<_>>(),
            })),
            SlashCommand::Quit => Reaction::Core(Command::Quit),
            SlashCommand::Message(text) => Reaction::Core(Command::Send {
                group: self.current()?,
                text,
            }),
        })
    }

    /// Updates the session from an event and renders it as JSON (`None`: nothing to print).
    pub fn observe(&mut self, event: &CoreEvent) -> Option<Value> {
        let group_fields = |group: &GroupRef| (group.name.clone(), group.id.to_hex());
        Some(match event {
            CoreEvent::Groups { groups } => {
                for listed in groups {
                    self.remember(&listed.group);
                    self.active.insert(listed.group.id.clone(), listed.active);
                }
                // The group the script had current when it last ran (recorded as the one
                // looked at last). Not simply the newest: anyone can add us to a group, and
                // the script's next message must not go there after a restart either.
                let active = groups.iter().filter(|listed| listed.active);
                let recorded = active
                    .clone()
                    .filter(|listed| listed.viewed_at > 0)
                    .max_by_key(|listed| listed.viewed_at);
                // A profile that never recorded one (from before this was recorded, or whose
                // groups were all left): the group joined last, as before.
                self.current = recorded
                    .or_else(|| active.clone().next_back())
                    .map(|listed| listed.group.id.clone());
                self.recorded = recorded.map(|listed| listed.group.id.clone());
                let list: Vec<Value> = groups
                    .iter()
                    .map(|listed| {
                        let (name, id) = group_fields(&listed.group);
                        let mut entry =
                            json!({"group": name, "group_id": id, "active": listed.active});
                        if let Some((epoch, code)) = &listed.epoch {
                            entry["epoch"] = json!(epoch);
                            entry["code"] = json!(code);
                        }
                        entry
                    })
                    .collect();
                json!({"event": "groups", "groups": list})
            }
            CoreEvent::Ready { name, fingerprint } => {
                json!({"event": "ready", "name": name, "fingerprint": fingerprint})
            }
            CoreEvent::Connection { state, detail } => {
                let state = match state {
                    crate::core::ConnectionState::Connecting => "connecting",
                    crate::core::ConnectionState::Connected => "connected",
                    crate::core::ConnectionState::Reconnecting => "reconnecting",
                };
                json!({"event": "connection", "state": state, "detail": detail})
            }
            CoreEvent::GroupCreated { group } => {
                // Current since its `/create` line (see `interpret`).
                self.remember(group);
                self.active.insert(group.id.clone(), true);
                let (name, id) = group_fields(group);
                json!({"event": "group_created", "group": name, "group_id": id})
            }
            CoreEvent::Joined { group, by } => {
                self.remember(group);
                self.active.insert(group.id.clone(), true);
                // Only when there is no current group: anyone can add us to a group, and the
                // script's next message must not go there instead of where it was going.
                if self.current.is_none() {
                    self.current = Some(group.id.clone());
                }
                let (name, id) = group_fields(group);
                json!({"event": "joined", "group": name, "group_id": id, "by": by})
            }
            CoreEvent::GroupRenamed { group, by } => {
                self.remember(group);
                let (name, id) = group_fields(group);
                json!({"event": "group_renamed", "group": name, "group_id": id, "by": by})
            }
            CoreEvent::RenameOvertaken {
                group,
                by,
                name: overtaken,
            } => {
                let (name, id) = group_fields(group);
                json!({"event": "rename_overtaken", "group": name, "group_id": id, "by": by, "name": overtaken})
            }
            CoreEvent::MemberAdded { group, user, by } => {
                let (name, id) = group_fields(group);
                json!({"event": "member_added", "group": name, "group_id": id, "user": user, "by": by})
            }
            CoreEvent::MemberRemoved { group, user, by } => {
                let (name, id) = group_fields(group);
                json!({"event": "member_removed", "group": name, "group_id": id, "user": user, "by": by})
            }
            CoreEvent::LeaveRequested { group } => {
                let (name, id) = group_fields(group);
                json!({"event": "leave_requested", "group": name, "group_id": id})
            }
            CoreEvent::OutOfSync { group } => {
                self.active.insert(group.id.clone(), false);
                let (name, id) = group_fields(group);
                json!({"event": "out_of_sync", "group": name, "group_id": id})
            }
            CoreEvent::RemovalExpired { group } => {
                self.active.insert(group.id.clone(), false);
                let (name, id) = group_fields(group);
                json!({"event": "removal_expired", "group": name, "group_id": id})
            }
            CoreEvent::ServerBehind {
                group,
                server_epoch,
                epoch,
            } => {
                self.active.insert(group.id.clone(), false);
                let (name, id) = group_fields(group);
                json!({"event": "server_behind", "group": name, "group_id": id, "server_epoch": server_epoch, "epoch": epoch})
            }
            CoreEvent::Left { group, by } => {
                self.active.insert(group.id.clone(), false);
                let (name, id) = group_fields(group);
                json!({"event": "left", "group": name, "group_id": id, "by": by})
            }
            CoreEvent::Message {
                group,
                from,
                text,
                seq,
                at,
            } => {
                let (name, id) = group_fields(group);
                json!({"event": "message", "group": name, "group_id": id, "from": from, "text": text, "seq": seq, "at": at})
            }
            CoreEvent::SearchResults {
                group,
                text,
                entries,
            } => {
                let (name, id) = group_fields(group);
                let results: Vec<Value> = entries
                    .iter()
                    .map(|entry| json!({"seq": entry.seq, "from": entry.sender, "text": entry.text, "at": entry.at}))
                    .collect();
                json!({"event": "search_results", "group": name, "group_id": id, "text": text, "results": results})
            }
            CoreEvent::Queued { .. } | CoreEvent::History { .. } | CoreEvent::Stopped => {
                return None;
            }
            CoreEvent::Sent {
                group,
                seq,
                local_id,
            } => {
                let (name, id) = group_fields(group);
                json!({"event": "sent", "group": name, "group_id": id, "seq": seq, "local_id": local_id})
            }
            CoreEvent::Failed {
                group,
                local_id,
                reason,
            } => {
                let (name, id) = group_fields(group);
                json!({"event": "failed", "group": name, "group_id": id, "local_id": local_id, "reason": reason})
            }
            CoreEvent::Members { group, members } => {
                let (name, id) = group_fields(group);
                json!({"event": "members", "group": name, "group_id": id, "members": members.iter().map(member_json).collect::<Vec<_>>()})
            }
            CoreEvent::EpochChanged { group, epoch, code } => {
                let (name, id) = group_fields(group);
                json!({"event": "epoch", "group": name, "group_id": id, "epoch": epoch, "code": code})
            }
            CoreEvent::KeyChanged {
                user,
                fingerprint,
                group,
            } => {
                let mut event =
                    json!({"event": "key_changed", "user": user, "fingerprint": fingerprint});
                if let Some(group) = group {
                    let (name, id) = group_fields(group);
                    event["group"] = json!(name);
                    event["group_id"] = json!(id);
                }
                event
            }
            CoreEvent::Fingerprint {
                user,
                fingerprint,
                verified,
                key_changed,
            } => json!({
                "event": "fingerprint", "user": user, "fingerprint": fingerprint, "verified": verified, "key_changed": key_changed
            }),
            CoreEvent::Verified { user } => json!({"event": "verified", "user": user}),
            CoreEvent::Status {
                group,
                ciphersuite,
                epoch,
                epoch_authenticator,
                code,
                members,
            } => {
                let (name, id) = group_fields(group);
                json!({
                    "event": "status", "group": name, "group_id": id, "ciphersuite": ciphersuite, "epoch": epoch,
                    "epoch_authenticator": epoch_authenticator, "code": code, "members": members
                })
            }
            CoreEvent::Error { message } => json!({"event": "error", "message": message}),
        })
    }
}

fn member_json(member: &MemberInfo) -> Value {
    json!({"name": member.name, "fingerprint": member.fingerprint, "verified": member.verified, "key_changed": member.key_changed})
}

/// What a typed line leads to.
#[derive(Debug)]
pub enum Reaction {
    Core(Command),
    Print(Value),
}

/// Records a new current group in the profile as the group looked at last (see
/// [`Session::current_to_record`]); not once quitting, when the core takes no more commands.
fn record_current(client: &Client, session: &mut Session, quitting: bool) {
    if quitting {
        return;
    }
    if let Some(group) = session.current_to_record() {
        let _ = client
            .inputs
            .send(CoreInput::Command(Command::MarkRead { group, seq: 0 }));
    }
}

async fn write_line(output: &mut (impl AsyncWrite + Unpin), value: &Value) -> std::io::Result<()> {
    let mut line = value.to_string();
    line.push('\n');
    output.write_all(line.as_bytes()).await?;
    output.flush().await
}

/// The core stopped without being asked to (the server's certificate changed, the name is
/// taken): a script must see a failure, not the exit code of a clean `/quit`. The reason was
/// printed as an `error` event just before.
fn stopped_by_itself() -> std::io::Error {
    std::io::Error::other("the client stopped; the last error event says why")
}

/// How a headless session ended, when it ended as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// `/quit`, end of input, SIGTERM or SIGHUP.
    Quit,
    /// SIGINT: the caller should exit as interrupted (status 130), so that a shell running it
    /// in a script or a loop stops too.
    Interrupted,
}

/// Where events go. Once a write fails (the reader went away: a closed pipe or terminal), the
/// session quits as on `/quit` and writes nothing more; the failure is returned at the end.
struct Output<W> {
    writer: W,
    failed: Option<std::io::Error>,
}

impl<W: AsyncWrite + Unpin> Output<W> {
    /// Writes one event. Returns false when the output has failed (now or before).
    async fn write(&mut self, value: &Value) -> bool {
        if self.failed.is_some() {
            return false;
        }
        match write_line(&mut self.writer, value).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "cannot write events; quitting");
                self.failed = Some(error);
                false
            }
        }
    }
}

/// Runs the headless session until `/quit`, EOF or a quit signal (after the outbox is
/// flushed; a second SIGTERM or SIGINT stops at once). Fails if the client stops by itself, or
/// if the events could not be written.
pub async fn run(
    mut client: Client,
    input: impl AsyncBufRead + Unpin,
    output: impl AsyncWrite + Unpin,
    mut signals: QuitSignals,
) -> std::io::Result<Ended> {
    let mut output = Output {
        writer: output,
        failed: None,
    };
    let mut session = Session::default();
    // The core lists the profile's groups first thing, and that sets the current group. A
    // script may write to it on its first line, so no line is read before the list arrived.
    loop {
        let Some(event) = client.events.recv().await else {
            client.finish().await;
            return Ok(Ended::Quit);
        };
        if event == CoreEvent::Stopped {
            client.finish().await;
            return Err(stopped_by_itself());
        }
        let listed = matches!(event, CoreEvent::Groups { .. });
        if let Some(value) = session.observe(&event) {
            output.write(&value).await;
        }
        if listed || output.failed.is_some() {
            break;
        }
    }
    // Split on bytes, not read as text: a line that is not UTF-8 (a Latin-1 byte in piped
    // input) must be refused on its own, not end the session as a read error would. Like
    // `lines()`, `Split` keeps a partly read line in itself, so the `select!` below may drop
    // `next_segment` without losing input.
    let mut lines = input.split(b'\n');
    let mut quitting = false;
    let mut ended = Ended::Quit;
    // SIGTERM and SIGINT received; a second one means "now". Hangups never count: a closed
    // terminal can send several, and also ends the input.
    let mut insisted = 0;
    // Quitting also stops reading: lines after `/quit`, end of input or a signal are not
    // commands any more.
    let quit = |client: &Client, quitting: &mut bool| {
        if !*quitting {
            *quitting = true;
            let _ = client.inputs.send(CoreInput::Command(Command::Quit));
        }
    };
    if output.failed.is_some() {
        quit(&client, &mut quitting);
    }
    loop {
        tokio::select! {
            line = lines.next_segment(), if !quitting => {
                let line = match line {
                    Ok(Some(bytes)) => match String::from_utf8(bytes) {
                        Ok(mut line) => {
                            if line.ends_with('\r') {
                                line.pop();
                            }
                            line
                        }
                        Err(_) => {
                            let refused = json!({"event": "error", "message": "a line of input is not UTF-8; it was not sent"});
                            if !output.write(&refused).await {
                                quit(&client, &mut quitting);
                            }
                            continue;
                        }
                    },
                    Ok(None) => {
                        quit(&client, &mut quitting);
                        continue;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot read standard input; quitting");
                        quit(&client, &mut quitting);
                        continue;
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                let reaction = session.interpret(&line);
                record_current(&client, &mut session, quitting);
                match reaction {
                    Ok(Reaction::Core(command)) => {
                        if command == Command::Quit {
                            quit(&client, &mut quitting);
                        } else if client.inputs.send(CoreInput::Command(command)).is_err() {
                            break;
                        }
                    }
                    Ok(Reaction::Print(value)) => {
                        if !output.write(&value).await {
                            quit(&client, &mut quitting);
                        }
                    }
                    Err(message) => {
                        if !output.write(&json!({"event": "error", "message": message})).await {
                            quit(&client, &mut quitting);
                        }
                    }
                }
            }
            event = client.events.recv() => {
                let Some(event) = event else { break };
                if event == CoreEvent::Stopped {
                    if !quitting {
                        client.finish().await;
                        return Err(stopped_by_itself());
                    }
                    break;
                }
                let shown = session.observe(&event);
                record_current(&client, &mut session, quitting);
                if let Some(value) = shown
                    && !output.write(&value).await
                {
                    quit(&client, &mut quitting);
                }
            }
            signal = signals.next() => {
                if signal == QuitSignal::Interrupt {
                    ended = Ended::Interrupted;
                }
                if signal != QuitSignal::Hangup {
                    insisted += 1;
                }
                if insisted >= 2 {
                    // Asked twice: the core stops without waiting for the outbox; what is
                    // still queued is stored and goes out at the next start.
                    tracing::info!(signal = signal.name(), "asked again to quit: stopping now");
                    let _ = client.inputs.send(CoreInput::Command(Command::Quit));
                    break;
                }
                tracing::info!(signal = signal.name(), "asked to quit: sending what is queued first");
                quit(&client, &mut quitting);
            }
        }
    }
    client.finish().await;
    match output.failed {
        Some(error) => Err(error),
        None => Ok(ended),
    }
}
