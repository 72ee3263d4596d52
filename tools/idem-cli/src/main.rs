//! `idem`: the operator CLI. See the crate docs (`idem_cli`) and README.md,
//! "Operating idem: the `idem` CLI".
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the async runtime: {err}");
            return idem_cli::Exit::Store.into();
        }
    };
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    runtime
        .block_on(idem_cli::run(std::env::args_os(), &mut out, &mut err))
        .into()
}
