// Command agent runs Argo's own executor-plugin agent (workflow/executor) against plugin
// processes given on the command line. The Kubernetes API it talks to is client-go's fake
// clientset holding one WorkflowTaskSet; every status patch the agent makes is reported on
// stdout. conformance/suite.py drives it.
//
// One source, one binary per Argo line: agent-v4/ and agent-v3/ are Go modules of their own
// (each with the go.mod of its Argo release) that link this file and add argo.go, which names
// the Argo types and functions used here for that line's import paths.
//
// Usage:
//
//	agent -plugin http://127.0.0.1:7581=TOKEN_FILE [-plugin URL=TOKEN_FILE ...]
//	         [-workflow NAME] [-namespace NS] [-uid UID] [-workers 16] [-patch-rate 250ms]
//
// Plugins are offered each task in the order given, as ARGO_PLUGIN_ADDRESSES orders them.
//
// stdin, one JSON object per line:
//
//	{"tasks": {"<node id>": <template>, ...}}  merge into spec.tasks (the first creates the TaskSet)
//	{"stop": true}                             delete the TaskSet: the agent returns (so does EOF)
//
// stdout, one JSON object per line:
//
//	{"event": "watching"}                      the agent's watch is open: tasks sent now reach it
//	{"event": "patch", "nodes": {...}}         one status patch, as the agent marshalled it
//	{"event": "exit", "error": "..."}          Agent() returned
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	kubefake "k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/rest"
	k8stesting "k8s.io/client-go/testing"
)

type pluginFlags []string

func (p *pluginFlags) String() string     { return strings.Join(*p, ",") }
func (p *pluginFlags) Set(v string) error { *p = append(*p, v); return nil }

type command struct {
	Tasks map[string]json.RawMessage `json:"tasks"`
	Stop  bool                       `json:"stop"`
}

// reporter writes one JSON object per line; the agent's goroutines report concurrently.
type reporter struct {
	mu  sync.Mutex
	out *json.Encoder
}

func (r *reporter) report(event map[string]any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.out.Encode(event); err != nil {
		fmt.Fprintln(os.Stderr, "agent: stdout:", err)
		os.Exit(1)
	}
}

func main() {
	var plugins pluginFlags
	flag.Var(&plugins, "plugin", "URL=TOKEN_FILE of one plugin sidecar (repeat, in order)")
	workflow := flag.String("workflow", "conformance", "workflow (and TaskSet) name")
	namespace := flag.String("namespace", "kubeflow-user-example-com", "workflow namespace")
	uid := flag.String("uid", "3f6c0d2e-7b1a-4c55-9a7e-2b8d1f0c9e41", "workflow uid")
	workers := flag.String("workers", "16", "ARGO_AGENT_TASK_WORKERS (Argo's default: 16)")
	patchRate := flag.String("patch-rate", "250ms", "ARGO_AGENT_PATCH_RATE (Argo's default: 10s)")
	flag.Parse()
	if len(plugins) == 0 {
		fmt.Fprintln(os.Stderr, "agent: give at least one -plugin URL=TOKEN_FILE")
		os.Exit(2)
	}
	// v3.7 and v4.0 read both inside Agent(); v4.1 takes them as NewAgentExecutor arguments.
	os.Setenv("ARGO_AGENT_TASK_WORKERS", *workers)
	os.Setenv("ARGO_AGENT_PATCH_RATE", *patchRate)

	var executors []templateExecutor
	for _, spec := range plugins {
		address, tokenFile, ok := strings.Cut(spec, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "agent: -plugin %q is not URL=TOKEN_FILE\n", spec)
			os.Exit(2)
		}
		// Raw bytes, no trimming: what `argoexec agent main` sends.
		token, err := os.ReadFile(tokenFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "agent:", err)
			os.Exit(2)
		}
		executors = append(executors, newPlugin(address, string(token)))
	}

	out := &reporter{out: json.NewEncoder(os.Stdout)}
	out.out.SetEscapeHTML(false)
	clientset := newClientset()
	watching := make(chan struct{}, 1)
	clientset.PrependWatchReactor("workflowtasksets", func(action k8stesting.Action) (bool, watch.Interface, error) {
		// Register the watcher before saying so: the fake does not replay existing objects.
		w, err := clientset.Tracker().Watch(action.GetResource(), action.GetNamespace())
		select {
		case watching <- struct{}{}:
		default:
		}
		return true, w, err
	})
	clientset.PrependReactor("patch", "workflowtasksets", func(action k8stesting.Action) (bool, runtime.Object, error) {
		var patch struct {
			Status struct {
				Nodes json.RawMessage `json:"nodes"`
			} `json:"status"`
		}
		if err := json.Unmarshal(action.(k8stesting.PatchAction).GetPatch(), &patch); err == nil {
			out.report(map[string]any{"event": "patch", "nodes": patch.Status.Nodes})
		}
		return false, nil, nil // and let the tracker apply it, as the apiserver would
	})

	agent := newAgentExecutor(kubefake.NewSimpleClientset(), nil, &rest.Config{Host: "http://127.0.0.1:1"},
		*namespace, *workflow, *uid, executors)
	agent.WorkflowInterface = clientset

	ctx := agentContext()
	done := make(chan error, 1)
	go func() { done <- agent.Agent(ctx) }()
	select {
	case <-watching:
		out.report(map[string]any{"event": "watching"})
	case err := <-done:
		out.report(map[string]any{"event": "exit", "error": fmt.Sprint(err)})
		os.Exit(1)
	}

	taskSets := clientset.ArgoprojV1alpha1().WorkflowTaskSets(*namespace)
	go func() {
		lines := bufio.NewScanner(os.Stdin)
		lines.Buffer(make([]byte, 1<<20), 64<<20)
		for lines.Scan() {
			var cmd command
			if err := json.Unmarshal(lines.Bytes(), &cmd); err != nil {
				fmt.Fprintln(os.Stderr, "agent: bad command:", err)
				os.Exit(2)
			}
			if cmd.Stop {
				break
			}
			if err := setTasks(ctx, taskSets, *workflow, cmd.Tasks); err != nil {
				fmt.Fprintln(os.Stderr, "agent: tasks:", err)
				os.Exit(2)
			}
		}
		// Deleting the TaskSet is how the agent learns its workflow is gone.
		if err := taskSets.Delete(ctx, *workflow, metav1.DeleteOptions{}); err != nil {
			fmt.Fprintln(os.Stderr, "agent: delete:", err)
			os.Exit(1)
		}
	}()
	err := <-done
	message := ""
	if err != nil {
		message = err.Error()
	}
	out.report(map[string]any{"event": "exit", "error": message})
}

type taskSetClient interface {
	Get(context.Context, string, metav1.GetOptions) (*taskSet, error)
	Create(context.Context, *taskSet, metav1.CreateOptions) (*taskSet, error)
	Update(context.Context, *taskSet, metav1.UpdateOptions) (*taskSet, error)
}

// setTasks merges tasks into spec.tasks, creating the TaskSet on first use, as the controller does.
func setTasks(ctx context.Context, taskSets taskSetClient, name string, raw map[string]json.RawMessage) error {
	tasks := map[string]template{}
	for id, text := range raw {
		var tmpl template
		if err := json.Unmarshal(text, &tmpl); err != nil {
			return fmt.Errorf("task %s: %w", id, err)
		}
		tasks[id] = tmpl
	}
	current, err := taskSets.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		taskSet := &taskSet{ObjectMeta: metav1.ObjectMeta{Name: name}, Spec: taskSetSpec{Tasks: tasks}}
		_, err = taskSets.Create(ctx, taskSet, metav1.CreateOptions{})
		return err
	}
	if current.Spec.Tasks == nil {
		current.Spec.Tasks = map[string]template{}
	}
	for id, tmpl := range tasks {
		current.Spec.Tasks[id] = tmpl
	}
	_, err = taskSets.Update(ctx, current, metav1.UpdateOptions{})
	return err
}
