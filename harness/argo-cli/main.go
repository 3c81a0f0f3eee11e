// Command argo is Argo's own `argo executor-plugin` command, and only that.
//
// `go install github.com/argoproj/argo-workflows/v4/cmd/argo` fails from the module proxy:
// the CLI's `argo server` embeds the UI's build output (ui/dist/app), which the module does
// not ship. The executor-plugin package needs none of it, so this binary mounts Argo's
// command under the same root name, and `argo executor-plugin build DIR` runs Argo's code
// whether this binary or an operator's full argo CLI is the one on hand.
package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/argoproj/argo-workflows/v4/cmd/argo/commands/executorplugin"
)

func main() {
	root := &cobra.Command{Use: "argo", SilenceUsage: true}
	root.AddCommand(executorplugin.NewRootCommand())
	if err := root.Execute(); err != nil {
		os.Exit(1)
	}
}
