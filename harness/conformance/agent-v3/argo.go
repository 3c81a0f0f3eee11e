package main

// The Argo v3 names ../agent.go uses.

import (
	"context"

	wfv1 "github.com/argoproj/argo-workflows/v3/pkg/apis/workflow/v1alpha1"
	"github.com/argoproj/argo-workflows/v3/pkg/client/clientset/versioned/fake"
	executorplugins "github.com/argoproj/argo-workflows/v3/pkg/plugins/executor"
	"github.com/argoproj/argo-workflows/v3/workflow/executor"
	"github.com/argoproj/argo-workflows/v3/workflow/executor/plugins/rpc"
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

// agentContext: v3 logs through logrus and needs nothing in the context.
func agentContext() context.Context { return context.Background() }
