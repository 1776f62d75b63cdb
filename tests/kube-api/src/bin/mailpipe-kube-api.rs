//! `mailpipe-kube-api [ADDR] [KUBECONFIG]`: runs the test server (default 127.0.0.1:0) and
//! writes a kubeconfig for kubectl (default ./kubeconfig), until interrupted.
#![forbid(unsafe_code)]

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:0".into())
        .parse()?;
    let kubeconfig = args.next().unwrap_or_else(|| "kubeconfig".into());
    let server = mailpipe_kube_api::KubeApiServer::start_on(addr).await?;
    server.write_kubeconfig(std::path::Path::new(&kubeconfig))?;
    println!("serving the Kubernetes API test server on {}", server.url());
    println!("export KUBECONFIG={kubeconfig}");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
