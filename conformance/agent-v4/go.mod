module driver-plugin/conformance/agent-v4

go 1.25.7

require github.com/argoproj/argo-workflows/v4 v4.0.5
