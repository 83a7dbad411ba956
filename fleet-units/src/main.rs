//! `unitgen services.yaml [-o DIR] [--hosts hosts.yaml] [--format fleet|systemd] [--check]`

use clap::{Parser, ValueEnum};
use fleet_units::render::RenderOptions;
use fleet_units::{generate, output, Error, Format, Job, SourceFile};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Generate systemd or fleet units from services.yaml: every container pinned to an exact image
/// tag or digest, instances spread over hosts by the placement rules.
///
/// Examples:
///   unitgen services.yaml -o units/                        # fleet templates and instances
///   unitgen services.yaml --format systemd --hosts hosts.yaml -o units/
///                                                          # units/<host>/svc@N.service
///   unitgen services.yaml --check                          # validate only
///
/// Exit status: 0 success, 1 invalid input (every problem is listed as FILE:LINE:COLUMN: FIELD:
/// MESSAGE), 2 usage error, 3 a file could not be read or written.
#[derive(Debug, Parser)]
#[command(name = "unitgen", version, verbatim_doc_comment)]
struct Cli {
    /// The services file (see docs/UNITGEN.md).
    #[arg(env = "FLOTILLA_UNITGEN_SERVICES")]
    services: PathBuf,

    /// Write units into DIR (created if needed; stale generated units in it are removed).
    /// Without it, units are printed to stdout, each after a `==> path <==` line.
    #[arg(
        short = 'o',
        long = "output",
        value_name = "DIR",
        env = "FLOTILLA_UNITGEN_OUTPUT"
    )]
    output: Option<PathBuf>,

    /// The host inventory for --format systemd.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_UNITGEN_HOSTS")]
    hosts: Option<PathBuf>,

    /// fleet: svc@.service templates + svc@N.service with [X-Fleet] rules.
    /// systemd: units placed by unitgen into DIR/<host>/svc@N.service.
    #[arg(long, value_enum, default_value_t = FormatArg::Fleet, env = "FLOTILLA_UNITGEN_FORMAT")]
    format: FormatArg,

    /// Validate the input (and, with --format systemd, the placement) and write nothing.
    #[arg(long, env = "FLOTILLA_UNITGEN_CHECK")]
    check: bool,

    /// Leave out `docker pull` (for images that exist only on the hosts, e.g. built locally).
    #[arg(long, env = "FLOTILLA_UNITGEN_NO_PULL")]
    no_pull: bool,

    /// Placement lock (--format systemd): read to keep instances where they are, then rewritten.
    /// Default: DIR/placement.lock when -o is given; without -o and --lock, placement starts fresh.
    #[arg(long, value_name = "FILE", env = "FLOTILLA_UNITGEN_LOCK")]
    lock: Option<PathBuf>,

    /// Absolute path of the docker CLI used in the units.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/usr/bin/docker",
        env = "FLOTILLA_UNITGEN_DOCKER"
    )]
    docker: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    Fleet,
    Systemd,
}

fn read_source(path: &Path) -> Result<SourceFile, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(SourceFile::new(path.display().to_string(), text))
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let format = match cli.format {
        FormatArg::Fleet => Format::Fleet,
        FormatArg::Systemd => Format::Systemd,
    };
    if !cli.docker.starts_with('/') {
        return Err(Error::Usage(format!(
            "--docker `{}` must be an absolute path",
            cli.docker
        ))
        .into());
    }
    if format == Format::Fleet && cli.lock.is_some() {
        return Err(Error::Usage(
            "--lock records placement, which only --format systemd does".into(),
        )
        .into());
    }
    let services = read_source(&cli.services)?;
    let hosts = cli.hosts.as_deref().map(read_source).transpose()?;
    let lock_path = match (&cli.lock, &cli.output, format) {
        (Some(l), _, _) => Some(l.clone()),
        (None, Some(dir), Format::Systemd) => Some(dir.join("placement.lock")),
        _ => None,
    };
    let lock = match &lock_path {
        Some(p) if p.exists() => Some(read_source(p)?),
        _ => None,
    };
    let source_name = cli
        .services
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "services.yaml".into());
    let job = Job {
        services,
        hosts,
        lock,
        format,
        render: RenderOptions {
            docker: cli.docker.clone(),
            pull: !cli.no_pull,
            source_name,
        },
    };
    let out = generate(&job)?;
    if cli.check {
        eprintln!("unitgen: ok: {}", out.summary);
        return Ok(());
    }
    match &cli.output {
        Some(dir) => {
            let report = output::write_tree(dir, &out.files)?;
            if let (Some(p), Some(placed)) = (&lock_path, &out.placement) {
                output::write_atomic(p, &fleet_units::lock::render(placed))?;
            }
            eprintln!(
                "unitgen: {} into {}: {} written, {} unchanged, {} stale removed",
                out.summary,
                dir.display(),
                report.written.len(),
                report.unchanged,
                report.removed.len()
            );
        }
        None => {
            print!("{}", output::listing(&out.files));
            if let (Some(p), Some(placed)) = (&lock_path, &out.placement) {
                output::write_atomic(p, &fleet_units::lock::render(placed))?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = match err.downcast_ref::<Error>() {
                Some(Error::Invalid(diags)) => {
                    for d in diags {
                        eprintln!("error: {d}");
                    }
                    eprintln!(
                        "unitgen: {} error{}; nothing written",
                        diags.len(),
                        if diags.len() == 1 { "" } else { "s" }
                    );
                    return ExitCode::from(1);
                }
                Some(Error::Usage(_)) => 2,
                Some(Error::Io { .. }) => 3,
                None => 3,
            };
            eprintln!("error: {:#}", err);
            ExitCode::from(code)
        }
    }
}
