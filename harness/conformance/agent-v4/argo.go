package main

// The Argo v4 names ../agent.go uses.

import (
	"context"

	wfv1 "github.com/argoproj/argo-workflows/v4/pkg/apis/workflow/v1alpha1"
	"github.com/argoproj/argo-workflows/v4/pkg/client/clientset/versioned/fake"
	executorplugins "github.com/argoproj/argo-workflows/v4/pkg/plugins/executor"
	"github.com/argoproj/argo-workflows/v4/util/logging"
	"github.com/argoproj/argo-workflows/v4/workflow/executor"
	"github.com/argoproj/argo-workflows/v4/workflow/executor/plugins/rpc"
)

type (
	template         = wfv1.Template
	taskSet          = wfv1.WorkflowTaskSet
	taskSetSpec      = wfv1.WorkflowTaskSetSpec
	templateExecutor = executorplugins.TemplateExecutor
)

var (
	newClientset     = fake.NewSimpleClientset
	newAgentExecutor = executor.NewAgentExecutor
)

// newPlugin builds the client `argoexec agent main` builds for each plugin sidecar.
func newPlugin(address, token string) templateExecutor { return rpc.New(address, token) }

// agentContext carries the logger Agent() requires (without one it panics).
func agentContext() context.Context {
	return logging.WithLogger(context.Background(), logging.NewSlogLogger(logging.Info, logging.JSON))
}
