"""Where the cluster state comes from: manifest files or the Kubernetes API."""
