//! Entry point: parse flags, start logging, run, map the outcome to an exit code
//! (0 ok, 1 runtime failure, 2 bad command line).

use std::process::ExitCode;

use log::error;
use rdma_plugin::config::{self, Command};
use rdma_plugin::daemon::lifecycle;
use rdma_plugin::tools::{diagnose, list, probe};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = match config::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jarvice-rdma-plugin: {e}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    match command {
        Command::Help(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("jarvice-rdma-plugin {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Serve(cfg) => match lifecycle::run(cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::from(e.exit_code())
            }
        },
        Command::List { config, json } => {
            outcome(list::report(&config, json).map(|r| print!("{r}")))
        }
        Command::Diagnose { config, json } => {
            let checks = diagnose::run(&config);
            if json {
                print!("{}", diagnose::as_json(&checks));
            } else {
                print!("{}", diagnose::as_text(&checks));
            }
            if diagnose::passed(&checks) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        // Every resource's socket (the DaemonSet's probes pass the same flags as the daemon).
        Command::Probe(cfg) => outcome(cfg.units().iter().try_for_each(|u| {
            probe::probe(&u.socket_path()).map(|seen| {
                print!("{seen}");
                println!(
                    "ok: {} answers as the kubelet expects",
                    u.socket_path().display()
                );
            })
        })),
    }
}

fn outcome<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}
