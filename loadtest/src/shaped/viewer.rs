//! A viewer of `loadtest shaped`: joins the room, subscribes only, records
//! what arrives ([`Recording`]) and takes the phase boundaries from its
//! controller. The unshaped viewer runs as a task of the generator; the
//! shaped one is the hidden `shaped-viewer` subcommand, started by the
//! generator inside the namespace, with the protocol below.
//!
//! stdin, one word a line, from the generator: `start` (publishing
//! began), `cap`, `uncap`, `stop`; each is timed when read, on the
//! viewer's own clock (EOF counts as `stop`). stdout, one JSON object a
//! line: `{"event":"ready"}` once connected and negotiated,
//! `{"event":"phase","phase":..}` for each word read, and last
//! `{"event":"report","report":{..}}` ([`ViewerReport`]) or
//! `{"event":"error","message":..}`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchboard_client::{Client, ClientError, Event, JoinOptions};
use switchboard_proto::{MediaMode, ServerMessage};
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio::time::timeout_at;

use super::record::{Phases, PublisherFigures, Recording};

/// What a viewer is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Start(Instant),
    Cap(Instant),
    Uncap(Instant),
    Stop(Instant),
}

/// Everything one viewer reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ViewerReport {
    /// From the start of the join to connected and negotiated.
    pub join_ms: f64,
    pub publishers: Vec<PublisherFigures>,
    /// Payloads not counted, by reason (`padding`: empty payloads).
    pub bad: BTreeMap<String, u64>,
    /// Connection states reported after `connected`.
    pub later_states: Vec<String>,
    /// Server `error` codes received.
    pub server_errors: Vec<String>,
    /// Tracks the server added (audio and video).
    pub tracks_added: u64,
}

/// Joins `room` as a subscriber only (no track published), media bound to
/// `bind_ip`; waits until connected and negotiated, within `limit`.
pub async fn join(
    url: &str,
    room: &str,
    name: &str,
    bind_ip: IpAddr,
    simulcast: Option<Vec<String>>,
    limit: Duration,
) -> Result<Client, String> {
    let deadline: tokio::time::Instant = (Instant::now() + limit).into();
    let mut opts = JoinOptions::sfu(url, room, name);
    opts.bind_ip = bind_ip;
    opts.publish_video = simulcast.is_some();
    opts.publish_audio = simulcast.is_some();
    opts.simulcast = simulcast;
    let mut client = match timeout_at(deadline, Client::join(opts)).await {
        Err(_) => return Err(format!("{name}: join timed out")),
        Ok(Err(ClientError::Refused(msg))) => return Err(format!("{name}: join refused: {msg}")),
        Ok(Err(e)) => return Err(format!("{name}: join: {e}")),
        Ok(Ok(c)) => c,
    };
    if client.joined.mode != MediaMode::Sfu {
        return Err(format!(
            "{name}: joined a room in mode {:?}, not sfu",
            client.joined.mode
        ));
    }
    let (mut connected, mut negotiated) = (false, false);
    while !(connected && negotiated) {
        match timeout_at(deadline, client.next_event()).await {
            Err(_) => {
                return Err(format!(
                    "{name}: not connected and negotiated within {limit:?}"
                ))
            }
            Ok(None | Some(Event::Closed)) => {
                return Err(format!("{name}: client closed before connecting"))
            }
            Ok(Some(Event::Connection(state))) => match state.as_str() {
                "connected" => connected = true,
                "failed" | "closed" => return Err(format!("{name}: connection {state}")),
                _ => {}
            },
            Ok(Some(Event::Negotiated)) => negotiated = true,
            Ok(Some(Event::Signal(ServerMessage::Error(e)))) => {
                return Err(format!(
                    "{name}: server error {} while joining",
                    e.code.as_str()
                ))
            }
            Ok(Some(_)) => {}
        }
    }
    Ok(client)
}

/// Records what `client` receives until `Stop` (or `hard`), taking the
/// phase boundaries from `control`. Returns the report, or why there is
/// none.
pub async fn view(
    client: &mut Client,
    mut rec: Recording,
    control: &mut mpsc::UnboundedReceiver<Control>,
    hard: Instant,
    join_ms: f64,
) -> Result<ViewerReport, String> {
    let mut report = ViewerReport {
        join_ms,
        ..ViewerReport::default()
    };
    let (mut start, mut cap, mut uncap) = (None, None, None);
    let end = loop {
        tokio::select! {
            ev = client.next_event() => match ev {
                None | Some(Event::Closed) => return Err("the client closed during the run".into()),
                Some(Event::Rtp { kind, packet, at, .. }) => rec.absorb(kind, &packet, at),
                Some(Event::TrackAdded { .. }) => report.tracks_added += 1,
                Some(Event::Connection(state)) => report.later_states.push(state),
                Some(Event::Signal(ServerMessage::Error(e))) => {
                    report.server_errors.push(e.code.as_str().to_owned());
                }
                Some(_) => {}
            },
            c = control.recv() => match c {
                Some(Control::Start(t)) => start = Some(t),
                Some(Control::Cap(t)) => cap = Some(t),
                Some(Control::Uncap(t)) => uncap = Some(t),
                Some(Control::Stop(t)) => break t,
                None => break Instant::now(),
            },
            () = tokio::time::sleep_until(hard.into()) => {
                return Err("--timeout expired while viewing".into());
            }
        }
    };
    let (Some(start), Some(cap), Some(uncap)) = (start, cap, uncap) else {
        return Err("stopped before every phase was announced".into());
    };
    let phases = Phases {
        start,
        cap,
        uncap,
        end,
    };
    report.publishers = rec.figures(&phases);
    report.bad = rec.bad.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    Ok(report)
}

/// The hidden `shaped-viewer` subcommand (run by `loadtest shaped` inside
/// its namespace).
#[derive(Debug, Clone, clap::Args)]
pub struct ViewerArgs {
    /// Signaling URL of the server.
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub room: String,
    /// Address the media socket binds to (the namespace's).
    #[arg(long)]
    pub bind_ip: IpAddr,
    /// This viewer's participant index (publishers are 0..N).
    #[arg(long)]
    pub index: usize,
    #[arg(long)]
    pub publishers: usize,
    #[arg(long)]
    pub participants: usize,
    #[arg(long, default_value = "20s", value_parser = crate::parse_duration)]
    pub join_timeout: Duration,
    /// Hard limit on the whole life of this process.
    #[arg(long, default_value = "150s", value_parser = crate::parse_duration)]
    pub timeout: Duration,
}

fn say(v: &serde_json::Value) {
    println!("{v}");
}

/// Entry point of `shaped-viewer`: 0 with a report, 2 otherwise (the
/// reason on stdout as an `error` event).
pub fn main(args: &ViewerArgs) -> ExitCode {
    let rt = match crate::runtime(1) {
        Ok(rt) => rt,
        Err(e) => {
            say(&serde_json::json!({"event": "error", "message": format!("runtime: {e}")}));
            return ExitCode::from(2);
        }
    };
    let result = rt.block_on(child(args));
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(report) => {
            say(&serde_json::json!({"event": "report", "report": report}));
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&serde_json::json!({"event": "error", "message": e}));
            ExitCode::from(2)
        }
    }
}

async fn child(args: &ViewerArgs) -> Result<ViewerReport, String> {
    let hard = Instant::now() + args.timeout;
    if args.publishers == 0 || args.index >= args.participants {
        return Err("bad --index, --publishers or --participants".into());
    }
    let started = Instant::now();
    let mut client = join(
        &args.url,
        &args.room,
        "shaped",
        args.bind_ip,
        None,
        args.join_timeout,
    )
    .await?;
    let join_ms = started.elapsed().as_secs_f64() * 1e3;
    say(&serde_json::json!({"event": "ready", "id": client.id}));
    // stdin lines become controls, timed as they are read.
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            let line = lines.next_line().await;
            let now = Instant::now();
            let c = match line.as_ref().map(|l| l.as_deref().map(str::trim)) {
                Ok(Some("start")) => Control::Start(now),
                Ok(Some("cap")) => Control::Cap(now),
                Ok(Some("uncap")) => Control::Uncap(now),
                Ok(Some("stop")) | Ok(None) | Err(_) => Control::Stop(now),
                Ok(Some(_)) => continue,
            };
            if let Ok(Some(word)) = &line {
                say(&serde_json::json!({"event": "phase", "phase": word.trim()}));
            }
            if tx.send(c).is_err() || matches!(c, Control::Stop(_)) {
                break;
            }
        }
    });
    let rec = Recording::new(args.index, args.participants, args.publishers);
    let result = view(&mut client, rec, &mut rx, hard, join_ms).await;
    client.leave();
    // Let the leave reach the server before the client is dropped.
    let until = Instant::now() + Duration::from_secs(1);
    while let Ok(Some(ev)) = timeout_at(until.into(), client.next_event()).await {
        if matches!(ev, Event::Closed) {
            break;
        }
    }
    result
}
