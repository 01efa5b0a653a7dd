//! A simulated cluster for the simulated-API and load tests: three apiservers over one
//! shared [`Store`] (as over one etcd), a passthrough gateway in front of them with https
//! health checks and least-conn, and an admin kubeconfig for the gateway.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apilb::demo::api::store::{Store, StoreLimits};
use apilb::demo::apiserver::{ApiServer, ApiServerOptions, Identity};

use super::gateway::{gateway, simple_config, Gw};
use super::tls::TlsFixture;
use super::{eventually, TOKEN};

pub struct SimCluster {
    pub tls: TlsFixture,
    pub store: Arc<Store>,
    pub servers: Vec<ApiServer>,
    pub gw: Gw,
    /// Admin credentials, server = the gateway's passthrough listener.
    pub kubeconfig: PathBuf,
}

/// Options of one simulated apiserver of the cluster (name `apiserver-i`).
pub fn sim_options(tls: &TlsFixture, i: usize, listen: SocketAddr) -> ApiServerOptions {
    ApiServerOptions {
        name: format!("apiserver-{i}"),
        listen,
        cert_pem: tls.pki.apiserver.cert_pem.clone(),
        key_pem: tls.pki.apiserver.key_pem.clone(),
        client_ca_pem: tls.pki.ca.cert_pem.clone(),
        tokens: vec![(
            TOKEN.into(),
            Identity {
                user: "token-user".into(),
                groups: vec!["system:authenticated".into()],
            },
        )],
        watch_interval: Duration::from_secs(1),
        anonymous: true,
    }
}

/// Starts the simulated apiserver `i` of a cluster at `listen` (retrying while an old
/// socket at that port closes).
pub async fn start_sim(
    tls: &TlsFixture,
    store: &Arc<Store>,
    i: usize,
    listen: SocketAddr,
) -> ApiServer {
    super::within(10, "start a simulated apiserver", async {
        loop {
            match ApiServer::start_with_api(sim_options(tls, i, listen), store.clone()).await {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await
}

impl SimCluster {
    pub async fn start(n: usize, limits: StoreLimits) -> Self {
        Self::start_with(n, limits, "").await
    }

    /// [`SimCluster::start`] with more pool settings (such as `[pool.rebalance]`).
    pub async fn start_with(n: usize, limits: StoreLimits, pool_extra: &str) -> Self {
        let tls = TlsFixture::new();
        let store = Store::new(limits);
        let mut servers = Vec::new();
        for i in 0..n {
            servers.push(start_sim(&tls, &store, i, "127.0.0.1:0".parse().expect("addr")).await);
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(ApiServer::addr).collect();
        let pool = format!(
            "balance = \"least-conn\"\n[pool.health]\ncheck = \"https\"\npath = \"/readyz\"\ninterval = \"300ms\"\ntimeout = \"250ms\"\nrise = 1\nfall = 1\n[pool.tls]\nca = \"{}\"\nserver_name = \"kubernetes\"\n{pool_extra}",
            tls.ca().display()
        );
        let gw = gateway(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            simple_config(&addrs, &pool, "idle_timeout = \"1h\"")
        ))
        .await;
        for i in 0..n {
            gw.first_check("p", &format!("b{i}")).await;
        }
        eventually(5, "every backend healthy", || {
            (0..n).all(|i| {
                gw.handle()
                    .backend_status("p", &format!("b{i}"))
                    .is_some_and(|s| s.state.as_str() == "healthy")
            })
        })
        .await;
        let url = apilb::demo::url_base(gw.addr());
        let kubeconfig = tls.file("kubeconfig", &apilb::demo::kubeconfig_yaml(&url, &tls.pki));
        Self {
            tls,
            store,
            servers,
            gw,
            kubeconfig,
        }
    }

    /// A kubeconfig for apiserver `i` directly (not through the gateway).
    pub fn kubeconfig_for(&self, i: usize) -> PathBuf {
        let url = apilb::demo::url_base(self.servers[i].addr());
        self.tls.file(
            &format!("kubeconfig-{i}"),
            &apilb::demo::kubeconfig_yaml(&url, &self.tls.pki),
        )
    }
}
