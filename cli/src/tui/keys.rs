//! What the user does: keys, pastes, the mouse, and the lines they enter
//! (the UI's own commands, or lines for the peer).

use std::time::SystemTime;

use peerchat_core::names::fold_name;
use ratatui::crossterm::event::{
    Event as TermEvent, KeyCode, KeyEvent, KeyEventKind, KeyModifiers, MouseEventKind,
};

use super::{App, Effect, COMMANDS, KEYS_HELP};

impl App {
    /// A terminal event: a key, a paste, the mouse, a resize.
    pub fn input(&mut self, event: TermEvent, wall: SystemTime) -> Vec<Effect> {
        self.dirty = true;
        match event {
            TermEvent::Key(key) if key.kind != KeyEventKind::Release => self.key(key, wall),
            TermEvent::Paste(text) => self.paste(&text, wall),
            TermEvent::Mouse(mouse) => {
                match mouse.kind {
                    MouseEventKind::ScrollUp => self.scroll_up(3),
                    MouseEventKind::ScrollDown => self.scroll_down(3),
                    _ => {}
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    fn key(&mut self, key: KeyEvent, wall: SystemTime) -> Vec<Effect> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        let e = &mut self.editor;
        match key.code {
            KeyCode::Char('c') if ctrl => {
                if e.is_empty() {
                    return vec![Effect::Quit];
                }
                e.clear();
            }
            KeyCode::Char('d') if ctrl => {
                if e.is_empty() {
                    return vec![Effect::Quit];
                }
                e.delete();
            }
            KeyCode::Char('z') if ctrl => return vec![Effect::Suspend],
            KeyCode::Char('l') if ctrl => return vec![Effect::Redraw],
            KeyCode::Char('n') if ctrl => self.switch((self.current + 1) % self.convs.len()),
            KeyCode::Char('p') if ctrl => {
                let n = self.convs.len();
                self.switch((self.current + n - 1) % n);
            }
            KeyCode::Char(c @ '1'..='9') if alt => self.switch(c as usize - '1' as usize),
            KeyCode::Char('a') if ctrl => e.home(),
            KeyCode::Char('e') if ctrl => e.end(),
            KeyCode::Char('b') if ctrl => e.left(),
            KeyCode::Char('f') if ctrl => e.right(),
            KeyCode::Char('u') if ctrl => e.kill_to_start(),
            KeyCode::Char('k') if ctrl => e.kill_to_end(),
            KeyCode::Char('w') if ctrl => e.kill_word_back(),
            KeyCode::Char('y') if ctrl => e.yank(),
            KeyCode::Char('h') if ctrl => e.backspace(),
            KeyCode::Char('b') if alt => e.word_left(),
            KeyCode::Char('f') if alt => e.word_right(),
            KeyCode::Char('d') if alt => e.kill_word_forward(),
            KeyCode::Backspace if alt => e.kill_word_back(),
            KeyCode::Char(c) if !ctrl && !alt => e.insert(c.encode_utf8(&mut [0; 4])),
            KeyCode::Backspace => e.backspace(),
            KeyCode::Delete => e.delete(),
            KeyCode::Left => e.left(),
            KeyCode::Right => e.right(),
            KeyCode::Up => e.older(),
            KeyCode::Down => e.newer(),
            KeyCode::Tab => {
                let commands: Vec<&str> = COMMANDS.iter().map(|(c, _)| *c).collect();
                let names = self.names();
                self.editor.complete(&commands, &names);
            }
            KeyCode::PageUp => self.scroll_up(self.pane.1.saturating_sub(2).max(1)),
            KeyCode::PageDown => self.scroll_down(self.pane.1.saturating_sub(2).max(1)),
            KeyCode::Home => self.scroll_up(usize::MAX / 2),
            KeyCode::End => self.convs[self.current].scroll = 0,
            KeyCode::Enter => {
                let line = self.editor.take();
                return self.submit(&line, wall);
            }
            _ => {}
        }
        Vec::new()
    }

    /// A bracketed paste: each whole line is taken as typed and sent; text
    /// after the last line break stays in the input line to be edited.
    fn paste(&mut self, text: &str, wall: SystemTime) -> Vec<Effect> {
        let text = text.replace("\r\n", "\n").replace('\r', "\n");
        let Some((whole, rest)) = text.rsplit_once('\n') else {
            self.editor.insert(&text);
            return Vec::new();
        };
        let mut effects = Vec::new();
        let mut lines = whole.split('\n');
        if let Some(first) = lines.next() {
            // The first line continues what was typed before the paste.
            self.editor.end();
            self.editor.insert(first);
            let line = self.editor.take();
            effects.extend(self.submit(&line, wall));
        }
        for line in lines {
            self.editor.remember(line);
            effects.extend(self.submit(line, wall));
        }
        self.editor.insert(rest);
        effects
    }

    /// Names Tab completes: the people online and the conversations open.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.online.values().map(|o| o.name.clone()).collect();
        names.extend(self.convs.iter().filter_map(|c| c.with.clone()));
        names
    }

    fn scroll_up(&mut self, rows: usize) {
        let c = &mut self.convs[self.current];
        c.scroll = c.scroll.saturating_add(rows);
    }

    fn scroll_down(&mut self, rows: usize) {
        let c = &mut self.convs[self.current];
        c.scroll = c.scroll.saturating_sub(rows);
    }

    /// A line as entered: a command of the UI's own, or one for the peer.
    pub fn submit(&mut self, line: &str, wall: SystemTime) -> Vec<Effect> {
        if line.trim().is_empty() {
            return Vec::new();
        }
        let mut effects = vec![Effect::Remember(line.to_string())];
        let current = self.current;
        let here = self.convs[current].with.clone();
        let to_here = |text: &str| match &here {
            Some(name) => format!("/msg {name} {text}"),
            // `//` keeps a leading slash in a message to everyone.
            None if text.starts_with('/') => format!("/{text}"),
            None => text.to_string(),
        };
        let Some(command) = line.strip_prefix('/').filter(|rest| !rest.starts_with('/')) else {
            let text = line.strip_prefix('/').unwrap_or(line);
            effects.push(Effect::Send(to_here(text)));
            return effects;
        };
        let (word, args) = command
            .split_once(char::is_whitespace)
            .unwrap_or((command, ""));
        let args = args.trim();
        match word {
            "me" if !args.is_empty() => {
                let text = format!("/me {args}");
                effects.push(Effect::Send(to_here(&text)));
            }
            "msg" => {
                // A name nobody knows gets the peer's error here, not a
                // conversation of its own.
                let known = args.split_whitespace().next().filter(|name| {
                    let folded = fold_name(name);
                    self.online.contains_key(&folded) || self.pins.contains_key(&folded)
                });
                if let Some(name) = known {
                    let conv = self.open(name);
                    self.switch(conv);
                }
                effects.push(Effect::Send(line.to_string()));
            }
            "query" => match args.split_whitespace().collect::<Vec<_>>()[..] {
                [name] => {
                    let conv = self.open(name);
                    self.switch(conv);
                }
                _ => self.status(current, wall, "usage: /query NAME".into(), true),
            },
            "close" => {
                if current == 0 {
                    let text = "everyone's conversation stays open (/quit leaves)".into();
                    self.status(current, wall, text, true);
                } else {
                    self.convs.remove(current);
                    self.switch(current - 1);
                }
            }
            "clear" => self.convs[current].clear(),
            "help" => {
                for (_, help) in COMMANDS {
                    self.status(current, wall, (*help).to_string(), false);
                }
                for help in KEYS_HELP {
                    self.status(current, wall, (*help).to_string(), false);
                }
            }
            "info" => self.info(args, wall),
            "history" => {
                // Without a name, the conversation shown.
                let mut words: Vec<&str> = args.split_whitespace().collect();
                let named = words
                    .first()
                    .is_some_and(|w| !w.bytes().all(|b| b.is_ascii_digit()));
                let name = match (named, &here) {
                    (true, _) => Some(words.remove(0).to_string()),
                    (false, Some(name)) => Some(name.clone()),
                    (false, None) => None,
                };
                let conv = match &name {
                    Some(name) => self.open(name),
                    None => 0,
                };
                self.convs[conv].backlog_asked = true;
                self.history_typed = true;
                self.switch(conv);
                let mut command = "/history".to_string();
                for word in name.iter().map(String::as_str).chain(words) {
                    command.push(' ');
                    command.push_str(word);
                }
                effects.push(Effect::Send(command));
            }
            "peers" | "whois" | "status" | "search" | "outbox" | "send" | "accept" | "reject"
            | "cancel" | "quit" => {
                effects.push(Effect::Send(line.to_string()));
            }
            _ => {
                let text = format!("unknown command /{word}; /help lists the commands");
                self.status(current, wall, text, true);
            }
        }
        effects
    }

    /// `/info ID`: each target of a message of ours, and its state.
    fn info(&mut self, args: &str, wall: SystemTime) {
        let current = self.current;
        let id = args.trim_start_matches('#').parse::<u64>().ok();
        let Some((id, d)) = id.and_then(|id| self.deliveries.get(&id).map(|d| (id, d.clone())))
        else {
            let text = "usage: /info ID, the number a mark shows (#ID) for one of your messages shown here".into();
            self.status(current, wall, text, true);
            return;
        };
        if d.targets.is_empty() {
            let text = format!("message {id} went to nobody: nobody else was online");
            self.status(current, wall, text, true);
            return;
        }
        for target in &d.targets {
            let state = if d.delivered.contains(target) {
                "delivered".to_string()
            } else if let Some(reason) = d.failed.get(target) {
                format!("not confirmed ({reason}); it may or may not have arrived")
            } else if let Some(reason) = d.queued.get(target) {
                format!("queued: {target} is away ({reason}); sent when back")
            } else {
                "on its way".to_string()
            };
            self.status(
                current,
                wall,
                format!("message {id} to {target}: {state}"),
                false,
            );
        }
    }
}
