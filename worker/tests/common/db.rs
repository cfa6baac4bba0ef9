//! Real databases for the dead-letter tests: SQLite files, and PostgreSQL and MariaDB
//! servers of our own on free ports (from the Debian packages), which tests can stop and
//! start again.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Row;

use super::free_port;

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn temp_dir(kind: &str, port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ew-{kind}-{port}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub enum Database {
    Sqlite { path: PathBuf },
    Postgres { port: u16, dir: PathBuf, bin: PathBuf, root: bool },
    MariaDb { port: u16, dir: PathBuf, child: Option<std::process::Child> },
}

impl Database {
    pub fn sqlite() -> Self {
        let dir = temp_dir("sqlite", free_port());
        Database::Sqlite { path: dir.join("dlq.db") }
    }

    pub fn postgres() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("postgresql must be installed (apt-get install postgresql)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb not found under /usr/lib/postgresql/*/bin");
        let port = free_port();
        let dir = temp_dir("pg", port);
        let root = is_root();
        if root {
            run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(&dir), "chown");
        }
        let mut initdb = pg_command(root, &bin.join("initdb"));
        initdb.arg("-D").arg(dir.join("data")).args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]);
        run(&mut initdb, "initdb");
        let mut db = Database::Postgres { port, dir, bin, root };
        db.start();
        db
    }

    pub fn mariadb() -> Self {
        let port = free_port();
        let dir = temp_dir("maria", port);
        let install = || {
            let _ = std::fs::remove_dir_all(dir.join("data"));
            let mut c = Command::new("mariadb-install-db");
            c.arg("--no-defaults")
                .arg(format!("--datadir={}", dir.join("data").display()))
                .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
            if is_root() {
                c.arg("--user=root");
            }
            c.output().expect("mariadb-install-db (apt-get install mariadb-server)")
        };
        // Bootstrapping occasionally fails on a loaded machine; a second try from scratch succeeds.
        let mut out = install();
        if !out.status.success() {
            eprintln!("mariadb-install-db failed once, retrying: {}", String::from_utf8_lossy(&out.stderr));
            out = install();
        }
        assert!(
            out.status.success(),
            "mariadb-install-db: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = Database::MariaDb { port, dir, child: None };
        db.start();
        db
    }

    pub fn name(&self) -> &'static str {
        match self {
            Database::Sqlite { .. } => "sqlite",
            Database::Postgres { .. } => "postgres",
            Database::MariaDb { .. } => "mariadb",
        }
    }

    /// The URL as the original worker's users write it (SQLAlchemy style, with a driver).
    pub fn sqlalchemy_url(&self) -> String {
        match self {
            Database::Sqlite { path } => format!("sqlite+aiosqlite:///{}", path.display()),
            Database::Postgres { port, .. } => format!("postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres"),
            Database::MariaDb { port, .. } => format!("mysql+aiomysql://root@127.0.0.1:{port}/ew"),
        }
    }

    /// A URL sqlx takes directly, for the tests' own queries.
    pub fn url(&self) -> String {
        match self {
            Database::Sqlite { path } => format!("sqlite://{}?mode=rwc", path.display()),
            Database::Postgres { port, .. } => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            Database::MariaDb { port, .. } => format!("mysql://root@127.0.0.1:{port}/ew"),
        }
    }

    pub fn start(&mut self) {
        match self {
            Database::Sqlite { .. } => {}
            Database::Postgres { port, dir, bin, root } => {
                let mut c = pg_command(*root, &bin.join("pg_ctl"));
                c.arg("-D")
                    .arg(dir.join("data"))
                    .arg("-l")
                    .arg(dir.join("log"))
                    .arg("-o")
                    .arg(format!("-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", dir.display()))
                    .args(["-w", "start"]);
                run(&mut c, "pg_ctl start");
            }
            Database::MariaDb { port, dir, child } => {
                let mut c = Command::new("mariadbd");
                c.arg("--no-defaults")
                    .arg(format!("--datadir={}", dir.join("data").display()))
                    .arg(format!("--port={port}"))
                    .arg(format!("--socket={}", dir.join("sock").display()))
                    .arg(format!("--pid-file={}", dir.join("pid").display()))
                    .arg(format!("--log-error={}", dir.join("err.log").display()))
                    .args(["--bind-address=127.0.0.1", "--skip-grant-tables", "--innodb-buffer-pool-size=16M"])
                    .args(["--innodb-log-file-size=8M", "--skip-name-resolve"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if is_root() {
                    c.arg("--user=root");
                }
                *child = Some(c.spawn().expect("mariadbd"));
            }
        }
        self.wait_up();
    }

    fn wait_up(&self) {
        if matches!(self, Database::Sqlite { .. }) {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = match self {
            Database::MariaDb { port, .. } => format!("mysql://root@127.0.0.1:{port}/mysql"),
            _ => self.url(),
        };
        let mariadb = matches!(self, Database::MariaDb { .. });
        let name = self.name();
        // Our own runtime on our own thread: callers may be inside an async test.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                sqlx::any::install_default_drivers();
                loop {
                    let ok = match sqlx::AnyPool::connect(&url).await {
                        Ok(p) => {
                            let sql = if mariadb { "CREATE DATABASE IF NOT EXISTS ew" } else { "SELECT 1" };
                            let ok = sqlx::query(sql).execute(&p).await.is_ok();
                            p.close().await;
                            ok
                        }
                        Err(_) => false,
                    };
                    if ok {
                        return;
                    }
                    assert!(Instant::now() < deadline, "{name} did not come up on time");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .join()
        .expect("database start-up");
    }

    pub fn stop(&mut self) {
        match self {
            Database::Sqlite { .. } => {}
            Database::Postgres { dir, bin, root, .. } => {
                let mut c = pg_command(*root, &bin.join("pg_ctl"));
                c.arg("-D").arg(dir.join("data")).args(["-m", "fast", "-w", "stop"]);
                let _ = c.output();
            }
            Database::MariaDb { child, .. } => {
                if let Some(mut c) = child.take() {
                    let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
                    let _ = c.wait();
                }
            }
        }
    }

    /// Run statements (setup) with a pool of our own.
    pub async fn exec(&self, sql: &str) {
        let pool = self.pool().await;
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            sqlx::query(stmt).execute(&pool).await.unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        pool.close().await;
    }

    /// The first column of every row, as text.
    pub async fn column(&self, sql: &str) -> Vec<String> {
        let pool = self.pool().await;
        let rows = sqlx::query(sql).fetch_all(&pool).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
        pool.close().await;
        rows.iter()
            .map(|r| {
                r.try_get::<String, _>(0)
                    .or_else(|_| r.try_get::<i64, _>(0).map(|v| v.to_string()))
                    .or_else(|_| r.try_get::<i32, _>(0).map(|v| v.to_string()))
                    .or_else(|_| r.try_get::<Vec<u8>, _>(0).map(|v| String::from_utf8_lossy(&v).into_owned()))
                    .unwrap_or_default()
            })
            .collect()
    }

    async fn pool(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&self.url())
            .await
            .expect("connect to the test database")
    }
}

fn pg_command(root: bool, program: &std::path::Path) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.stop();
        let dir = match self {
            Database::Sqlite { path } => path.parent().map(|p| p.to_path_buf()),
            Database::Postgres { dir, .. } | Database::MariaDb { dir, .. } => Some(dir.clone()),
        };
        if let Some(d) = dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
