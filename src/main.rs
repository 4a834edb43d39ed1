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
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    logger.format_target(false);
    // The HTTP and TLS crates' debug lines are per request: with RUST_LOG=debug they would
    // drown ours. Naming them in RUST_LOG still turns them on.
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    for noisy in ["ureq", "ureq_proto", "rustls"] {
        if !spec.contains(noisy) {
            logger.filter_module(noisy, log::LevelFilter::Info);
        }
    }
    logger.init();
    match command {
        Command::Help(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("jarvice-rdma-plugin {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Serve(cfg) => match serve(cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!("{e}");
                ExitCode::from(e.exit_code())
            }
        },
        #[cfg(feature = "dra")]
        Command::List { config, .. } if config.frontend == config::Frontend::Dra => {
            print!("{}", rdma_plugin::dra::list::report(&config));
            ExitCode::SUCCESS
        }
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
        #[cfg(feature = "dra")]
        Command::Probe(cfg) if cfg.frontend == config::Frontend::Dra => {
            outcome(rdma_plugin::dra::probe::probe(&cfg.dra).map(|seen| {
                print!("{seen}");
                println!("ok: the DRA driver answers as the kubelet expects");
            }))
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

/// The front-end `--frontend` names.
fn serve(cfg: config::Config) -> Result<(), lifecycle::Error> {
    match cfg.frontend {
        config::Frontend::DevicePlugin => lifecycle::run(cfg),
        #[cfg(feature = "dra")]
        config::Frontend::Dra => rdma_plugin::dra::daemon::run(cfg),
        // `config::parse` refuses `--frontend dra` without the feature.
        #[cfg(not(feature = "dra"))]
        config::Frontend::Dra => lifecycle::run(cfg),
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
