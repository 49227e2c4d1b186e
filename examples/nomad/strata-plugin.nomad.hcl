# Strata as a Nomad CSI plugin: one monolith (controller + node) per client node, since
# volumes are local to the node that holds them.
job "strata-plugin" {
  type = "system"

  group "strata" {
    task "plugin" {
      driver = "docker"

      config {
        image      = "ghcr.io/strata-csi/strata:0.1.0"
        privileged = true
        args = [
          "serve",
          "--endpoint=unix:///csi/csi.sock",
          "--node-id=${node.unique.name}",
          "--pool=/var/lib/strata/pool",
          "--pool-image=100Gi",
          "--health-address=127.0.0.1:9809",
          # Nomad stages and publishes under the plugin's mount_dir.
          "--allowed-path-prefix=/csi",
        ]
        mount {
          type     = "bind"
          source   = "/var/lib/strata"
          target   = "/var/lib/strata"
          readonly = false
          bind_options {
            propagation = "rshared"
          }
        }
        mount {
          type   = "bind"
          source = "/dev"
          target = "/dev"
        }
      }

      csi_plugin {
        id        = "strata"
        type      = "monolith"
        mount_dir = "/csi"
      }

      resources {
        cpu    = 100
        memory = 128
      }
    }
  }
}
