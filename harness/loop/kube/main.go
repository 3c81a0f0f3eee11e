// Command kube is the Kubernetes half of `make loop`: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, kubectl, the kubelet and kube-proxy, each the real
// program from its own module at one release, plus the throw-away PKI they share. One binary,
// one program per process:
//
//	kube pki <dir> [ip...]              CA, apiserver serving cert (also for each ip), admin
//	                                    client cert, SA key
//	kube etcd <data-dir> <client-url> <peer-url>
//	kube kube-apiserver [flags]         k8s.io/kubernetes/cmd/kube-apiserver
//	kube kube-controller-manager [flags]
//	kube kubectl [args]
//	kube kubelet [flags]                k8s.io/kubernetes/cmd/kubelet
//	kube kube-proxy [flags]             k8s.io/kubernetes/cmd/kube-proxy
//	kube kube-scheduler [flags]         k8s.io/kubernetes/cmd/kube-scheduler
//
// Nothing here is a stand-in: the harness (loop/run.py) chooses the flags.
package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	kubectl "k8s.io/kubectl/pkg/cmd"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: kube pki|etcd|kube-apiserver|kube-controller-manager|kubectl|kubelet|kube-proxy|kube-scheduler ...")
		os.Exit(2)
	}
	program, args := os.Args[1], os.Args[2:]
	switch program {
	case "pki":
		os.Exit(report(writePKI(args)))
	case "etcd":
		os.Exit(report(runEtcd(args)))
	case "kube-apiserver":
		command := apiserver.NewAPIServerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kube-controller-manager":
		command := controllermanager.NewControllerManagerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kubelet":
		command := kubelet.NewKubeletCommand(context.Background())
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kube-proxy":
		command := proxy.NewProxyCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kube-scheduler":
		command := scheduler.NewSchedulerCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	case "kubectl":
		command := kubectl.NewDefaultKubectlCommand()
		command.SetArgs(args)
		if err := cli.RunNoErrOutput(command); err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	fmt.Fprintf(os.Stderr, "kube: unknown program %q\n", program)
	os.Exit(2)
}

func report(err error) int {
	if err != nil {
		fmt.Fprintf(os.Stderr, "kube %s: %v\n", os.Args[1], err)
		return 1
	}
	return 0
}

// runEtcd serves one embedded etcd member until SIGTERM or SIGINT.
func runEtcd(args []string) error {
	if len(args) != 3 {
		return fmt.Errorf("usage: kube etcd <data-dir> <client-url> <peer-url>")
	}
	client, err := url.Parse(args[1])
	if err != nil {
		return err
	}
	peer, err := url.Parse(args[2])
	if err != nil {
		return err
	}
	config := embed.NewConfig()
	config.Dir = args[0]
	config.LogLevel = "warn"
	config.ListenClientUrls = []url.URL{*client}
	config.AdvertiseClientUrls = []url.URL{*client}
	config.ListenPeerUrls = []url.URL{*peer}
	config.AdvertisePeerUrls = []url.URL{*peer}
	config.InitialCluster = config.InitialClusterFromName(config.Name)
	server, err := embed.StartEtcd(config)
	if err != nil {
		return err
	}
	defer server.Close()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-server.Server.ReadyNotify():
		fmt.Fprintln(os.Stderr, "etcd: ready")
	case <-stop:
		return nil
	}
	select {
	case err := <-server.Err():
		return err
	case <-stop:
		return nil
	}
}
